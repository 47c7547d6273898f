//! `fabric cluster add-node` and `fabric cluster remove-node`: membership changes of a running
//! cluster that `fabric cluster init` wrote ([`super::directory`] keeps the members).
//!
//! `add-node` reads the cluster directory (CA, admin token, an existing node's config), asks a
//! running node for the current members (`GET /v1/cluster`), issues the new node's
//! certificate, writes `DIR/node-<id>.toml` (ports laid out as `init` lays them out; its
//! `founders` the cluster's founders, its `members` the current members and itself), then
//! records the node in the metadata group (`POST /v1/cluster/nodes`). The operator starts it
//! with `fabric serve --config DIR/node-<id>.toml`; every group adds it as a learner, catches
//! it up and promotes it. `remove-node` records the removal (`DELETE /v1/cluster/nodes/<id>`);
//! once `/v1/cluster` shows the node in no group, it can be stopped.

use super::config::{Member, NODE_ID_MAX};
use super::init::{config_path, node_ports, ADMIN_TOKEN_FILE, CA_DIR, NODE_CERT_VALIDITY_DAYS};
use super::pki::{self, ClusterCa, PkiError};
use crate::config::{Config, ConfigError};
use crate::files::{self, FileError, MODE_SECRET};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Host names the new node's certificate carries (it runs on this host, as `init`'s do).
const NODE_HOSTS: [&str; 2] = ["127.0.0.1", "localhost"];

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} holds no node-<id>.toml: run `fabric cluster init` first")]
    NoConfig(PathBuf),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("{0}")]
    Invalid(String),
    #[error("{url}: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("{url} answered {status}: {body}")]
    Refused {
        url: String,
        status: u16,
        body: String,
    },
}

/// What `add-node` wrote and recorded.
#[derive(Debug, Clone)]
pub struct Added {
    pub id: u64,
    pub config: PathBuf,
    pub http: String,
}

/// The config of the lowest-numbered node in `dir` (the cluster's shape: id, shards, CA,
/// founders, ports).
fn reference_config(dir: &Path) -> Result<(u64, Config), JoinError> {
    let entries = std::fs::read_dir(dir).map_err(|source| JoinError::Read {
        path: dir.to_path_buf(),
        source,
    })?;
    let id = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| {
            n.strip_prefix("node-")?
                .strip_suffix(".toml")?
                .parse::<u64>()
                .ok()
        })
        .min()
        .ok_or_else(|| JoinError::NoConfig(dir.to_path_buf()))?;
    Ok((id, Config::from_toml_file(&config_path(dir, id))?))
}

fn read_token(dir: &Path) -> Result<String, JoinError> {
    let path = dir.join(ADMIN_TOKEN_FILE);
    let t = std::fs::read_to_string(&path).map_err(|source| JoinError::Read { path, source })?;
    Ok(t.trim().to_string())
}

/// `GET url/v1/cluster`'s members: (id, link, http).
async fn current_members(url: &str, token: &str) -> Result<Vec<Member>, JoinError> {
    let v = admin_call(
        reqwest::Method::GET,
        &format!("{url}/v1/cluster"),
        token,
        None,
    )
    .await?;
    let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
    let mut members = Vec::new();
    for n in nodes {
        let (Some(id), Some(link), Some(http)) =
            (n["id"].as_u64(), n["link"].as_str(), n["http"].as_str())
        else {
            continue;
        };
        let link = link
            .parse()
            .map_err(|_| JoinError::Invalid(format!("node {id}'s link {link:?}")))?;
        members.push(Member {
            id,
            link,
            http: http.to_string(),
        });
    }
    if members.is_empty() {
        return Err(JoinError::Invalid(format!(
            "{url}/v1/cluster lists no node"
        )));
    }
    Ok(members)
}

/// How long `add-node` and `remove-node` retry an `unavailable` answer (a metadata group
/// between leaders, a node just started): each change is appended with an idempotency key, so
/// a retry records it once.
const UNAVAILABLE_RETRY_MS_MAX: u64 = 30_000;

async fn admin_call(
    method: reqwest::Method,
    url: &str,
    token: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, JoinError> {
    let deadline =
        std::time::Instant::now() + std::time::Duration::from_millis(UNAVAILABLE_RETRY_MS_MAX);
    let mut retried = false;
    loop {
        match admin_call_once(method.clone(), url, token, body.clone()).await {
            Err(JoinError::Refused { status: 503, .. }) if std::time::Instant::now() < deadline => {
                retried = true;
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            // A removal retried after an `unavailable` whose change went in: the node is gone.
            Err(JoinError::Refused { status: 404, .. })
                if retried && method == reqwest::Method::DELETE =>
            {
                return Ok(serde_json::json!({ "members": null }));
            }
            other => return other,
        }
    }
}

async fn admin_call_once(
    method: reqwest::Method,
    url: &str,
    token: &str,
    body: Option<serde_json::Value>,
) -> Result<serde_json::Value, JoinError> {
    let http = |source| JoinError::Http {
        url: url.to_string(),
        source,
    };
    let mut req = reqwest::Client::new()
        .request(method, url)
        .bearer_auth(token)
        .timeout(std::time::Duration::from_secs(30));
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.map_err(http)?;
    let status = resp.status().as_u16();
    let text = resp.text().await.map_err(http)?;
    if status != 200 {
        return Err(JoinError::Refused {
            url: url.to_string(),
            status,
            body: text,
        });
    }
    serde_json::from_str(&text).map_err(|e| JoinError::Invalid(format!("{url}: {e}")))
}

/// Writes node `id`'s certificate and config into `dir` and records it in the cluster
/// reached at `url` (see the module docs). `id` unset: one above the highest member.
pub async fn add_node(dir: &Path, url: &str, id: Option<u64>) -> Result<Added, JoinError> {
    let url = url.trim_end_matches('/');
    let token = read_token(dir)?;
    let (ref_id, reference) = reference_config(dir)?;
    let Some(c) = reference.cluster.clone() else {
        return Err(JoinError::Invalid(
            "the reference config has no [cluster]".into(),
        ));
    };
    let current = current_members(url, &token).await?;
    let id = id.unwrap_or_else(|| current.iter().map(|m| m.id).max().unwrap_or(0) + 1);
    if id == 0 || id > NODE_ID_MAX || current.iter().any(|m| m.id == id) {
        return Err(JoinError::Invalid(format!(
            "node id {id} is taken or out of range"
        )));
    }
    let base = reference.listen.port() as u64 - 10 * (ref_id - 1);
    let ports = u16::try_from(base)
        .ok()
        .and_then(|b| node_ports(b, id))
        .ok_or_else(|| JoinError::Invalid(format!("node {id}'s ports are past 65535")))?;
    let at = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let own = Member {
        id,
        link: at(ports.link),
        http: format!("http://{}", at(ports.http)),
    };
    let ca = ClusterCa::load_dir(&dir.join(CA_DIR))?;
    let hosts: Vec<String> = NODE_HOSTS.iter().map(|h| h.to_string()).collect();
    let node_dir = dir.join(format!("node-{id}"));
    ca.issue_node(id, &hosts, NODE_CERT_VALIDITY_DAYS)?
        .save(&node_dir)?;
    let (node_cert, node_key) = pki::node_files(&node_dir, id);
    let mut members = current;
    members.push(own.clone());
    let mut cluster = super::config::ClusterConfig::new(
        c.id.clone(),
        id,
        own.link,
        c.ca_cert.clone(),
        node_cert,
        node_key,
        members,
    );
    cluster.founders = Some(c.founders().into_iter().collect());
    cluster.raft_heartbeat_ms = c.raft_heartbeat_ms;
    cluster.raft_election_timeout_ms = c.raft_election_timeout_ms;
    let config = Config {
        data_dir: node_dir.join("data"),
        listen: at(ports.http),
        quic_listen: Some(at(ports.quic)),
        metrics_listen: Some(at(ports.metrics)),
        cluster: Some(cluster),
        ..reference
    };
    config
        .validate()
        .map_err(|e| JoinError::Invalid(format!("node {id}'s config: {e}")))?;
    let path = config_path(dir, id);
    let text = format!(
        "# Node {id}, added by `fabric cluster add-node`.\n# Run it with: fabric serve --config {}\n\n{}",
        path.display(),
        toml::to_string(&config).map_err(|e| JoinError::Invalid(e.to_string()))?
    );
    files::write_atomic(&path, text.as_bytes(), MODE_SECRET)?;
    let body = serde_json::json!({"id": id, "link": own.link.to_string(), "http": own.http});
    admin_call(
        reqwest::Method::POST,
        &format!("{url}/v1/cluster/nodes"),
        &token,
        Some(body),
    )
    .await?;
    Ok(Added {
        id,
        config: path,
        http: own.http,
    })
}

/// Records node `id`'s removal in the cluster reached at `url`; answers the members.
pub async fn remove_node(dir: &Path, url: &str, id: u64) -> Result<serde_json::Value, JoinError> {
    let url = url.trim_end_matches('/');
    let token = read_token(dir)?;
    let u = format!("{url}/v1/cluster/nodes/{id}");
    admin_call(reqwest::Method::DELETE, &u, &token, None).await
}
