//! The client side of the `fabric` command line: admin calls (`mesh create`, `peer add`),
//! `keygen`, and a peer's `send`, `append`, `tail` and `replay` (docs/CLI.md). Transport and
//! hello are `fabric::client`'s business: a `ws://` or `quic://` URL, a token or a key file.
//!
//! Output is one line per result, for people by default and one JSON object per line with
//! `--json`. Errors go to stderr with a non-zero exit status.

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use fabric::client::{read_http, split_urls, Admin, Client, ClientConfig, ClientError, Incoming};
use fabric::identity::{parse_public_key, Identity};
use fabric_proto::{codec, Body, DeliveredEvent, ServerOp};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

/// Where `fabric keygen` writes the private key unless told otherwise.
const KEY_FILE_DEFAULT: &str = "fabric-ed25519.key";
/// Most conversation entries `fabric replay` asks for unless told otherwise.
const REPLAY_LIMIT_DEFAULT: u32 = 100;

#[derive(Subcommand)]
pub enum ClientCommand {
    /// Meshes (admin): `fabric mesh create ID`.
    Mesh {
        #[command(subcommand)]
        cmd: MeshCmd,
    },
    /// Peers (admin): `fabric peer add MESH PEER [--group G]... [--public-key KEY]`.
    Peer {
        #[command(subcommand)]
        cmd: PeerCmd,
    },
    /// Make an ed25519 key for key hellos: writes the private key file (mode 0600, never
    /// overwritten) and prints the public key to register with `peer add --public-key`.
    Keygen(KeygenArgs),
    /// Send one inbox message: `--to PEER`, `--to group:NAME` or `--to '*'`. Prints its pos.
    Send(SendArgs),
    /// Append one entry to a conversation. Prints its seq.
    Append(AppendArgs),
    /// Follow the peer's inbox (printing and acking each delivery), or with `--conv` follow a
    /// conversation from `--from`.
    Tail(TailArgs),
    /// Read a page of a conversation over HTTP (needs a peer token).
    Replay(ReplayArgs),
}

#[derive(Subcommand)]
pub enum MeshCmd {
    /// Create a mesh.
    Create {
        /// The mesh id.
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
pub enum PeerCmd {
    /// Add a peer. Without --public-key it gets a token, printed once (the node keeps only
    /// its hash); with one it says hello by signature, and gets a token as well only with
    /// --token.
    Add {
        mesh: String,
        peer: String,
        /// A group the peer belongs to (repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
        /// The peer's ed25519 public key: 64 hex characters, or a key file from `fabric keygen`.
        #[arg(long)]
        public_key: Option<String>,
        /// With --public-key: make a token too.
        #[arg(long)]
        token: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// How to reach the admin API.
#[derive(Args)]
pub struct AdminArgs {
    /// The node's HTTP base URL; or a comma-separated list, tried in order.
    #[arg(
        long = "http",
        env = "FABRIC_HTTP",
        default_value = "http://127.0.0.1:7400"
    )]
    http: String,
    /// The admin bearer token.
    #[arg(long, env = "FABRIC_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: String,
    /// One JSON object per line instead of text.
    #[arg(long)]
    json: bool,
}

/// Who the peer is and how to reach its node.
#[derive(Args)]
pub struct PeerArgs {
    /// The session URL: ws://HOST:PORT/v1/ws, http://HOST:PORT (its WebSocket endpoint) or
    /// quic://HOST:PORT; or a cluster's nodes as a comma-separated list (tried in order).
    #[arg(long, env = "FABRIC_URL", default_value = "ws://127.0.0.1:7400/v1/ws")]
    url: String,
    /// The node's HTTP base URL (replay); or a comma-separated list, tried in order.
    #[arg(
        long = "http",
        env = "FABRIC_HTTP",
        default_value = "http://127.0.0.1:7400"
    )]
    http: String,
    #[arg(long, env = "FABRIC_MESH")]
    mesh: String,
    #[arg(long, env = "FABRIC_PEER")]
    peer: String,
    /// The peer's token.
    #[arg(
        long,
        env = "FABRIC_TOKEN",
        hide_env_values = true,
        conflicts_with = "key"
    )]
    token: Option<String>,
    /// The peer's private key file (`fabric keygen`): say hello by signature.
    #[arg(long, env = "FABRIC_KEY")]
    key: Option<PathBuf>,
    /// One JSON object per line instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct KeygenArgs {
    /// Where to write the private key file.
    #[arg(long, default_value = KEY_FILE_DEFAULT)]
    out: PathBuf,
    /// One JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct SendArgs {
    /// PEER, group:NAME or '*'.
    #[arg(long)]
    to: String,
    /// The body: JSON text, or any other text (sent as a JSON string).
    body: String,
    #[command(flatten)]
    peer: PeerArgs,
}

#[derive(Args)]
pub struct AppendArgs {
    #[arg(long)]
    conv: String,
    /// The body: JSON text, or any other text (sent as a JSON string).
    body: String,
    /// Idempotency key: a retry with the same key gets the original seq. (`--key` is the
    /// peer's key file, as in every peer command.)
    #[arg(long = "idempotency-key")]
    idempotency_key: Option<String>,
    #[command(flatten)]
    peer: PeerArgs,
}

#[derive(Args)]
pub struct TailArgs {
    /// Follow this conversation instead of the inbox.
    #[arg(long)]
    conv: Option<String>,
    /// With --conv: the first seq to show.
    #[arg(long, default_value_t = 1)]
    from: u64,
    /// Exit after this many items (0: no limit).
    #[arg(long, default_value_t = 0)]
    count: u64,
    /// Exit after this many seconds (0: no limit). With --count, not reaching the count in
    /// time is an error.
    #[arg(long, default_value_t = 0)]
    timeout_secs: u64,
    #[command(flatten)]
    peer: PeerArgs,
}

#[derive(Args)]
pub struct ReplayArgs {
    #[arg(long)]
    conv: String,
    #[arg(long, default_value_t = 1)]
    from: u64,
    #[arg(long, default_value_t = REPLAY_LIMIT_DEFAULT)]
    limit: u32,
    #[command(flatten)]
    peer: PeerArgs,
}

/// Runs one client subcommand on a small runtime of its own.
pub fn run(cmd: ClientCommand) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(run_async(cmd))
}

// Over 70 lines: one arm per CLI command.
async fn run_async(cmd: ClientCommand) -> anyhow::Result<()> {
    match cmd {
        ClientCommand::Mesh {
            cmd: MeshCmd::Create { id, admin },
        } => {
            let (token, id_ref) = (admin.admin_token.as_str(), id.as_str());
            on_any_node(&admin.http, |base| async move {
                Admin::new(&base, token).create_mesh(id_ref).await
            })
            .await
            .with_context(|| format!("cannot create mesh {id:?}"))?;
            print(admin.json, json!({ "mesh": id }), || {
                format!("created mesh {id}")
            });
        }
        ClientCommand::Peer {
            cmd:
                PeerCmd::Add {
                    mesh,
                    peer,
                    groups,
                    public_key,
                    token,
                    admin,
                },
        } => add_peer(mesh, peer, groups, public_key, token, admin).await?,
        ClientCommand::Keygen(a) => {
            let id = Identity::generate()?;
            id.save(&a.out)?;
            let public = id.public_key_hex();
            let path = a.out.display().to_string();
            print(
                a.json,
                json!({ "public_key": public, "file": path }),
                || format!("{public}\n(private key written to {path}; keep it secret)"),
            );
        }
        ClientCommand::Send(a) => {
            let client = connect(&a.peer).await?;
            let to = fabric_proto::Target::parse(&a.to).map_err(|e| anyhow::anyhow!(e.message))?;
            let pos = client
                .send_raw(to, body_of(&a.body))
                .await
                .context("send failed")?;
            print(a.peer.json, json!({ "pos": pos }), || {
                format!("sent pos {pos}")
            });
            client.close().await;
        }
        ClientCommand::Append(a) => {
            let client = connect(&a.peer).await?;
            let seq = client
                .append_raw(
                    a.conv.as_str().into(),
                    body_of(&a.body),
                    a.idempotency_key.as_deref().map(Into::into),
                )
                .await
                .context("append failed")?;
            print(a.peer.json, json!({ "conv": a.conv, "seq": seq }), || {
                format!("appended {} seq {seq}", a.conv)
            });
            client.close().await;
        }
        ClientCommand::Tail(a) => tail(a).await?,
        ClientCommand::Replay(a) => {
            let Some(token) = a.peer.token.as_deref() else {
                bail!(
                    "replay reads over HTTP, which takes a peer --token; with a key, use \
                     `fabric tail --conv {} --from {}`",
                    a.conv,
                    a.from
                );
            };
            let (mesh, conv) = (a.peer.mesh.as_str(), a.conv.as_str());
            let (events, head) = on_any_node(&a.peer.http, |base| async move {
                read_http(&base, token, mesh, conv, a.from, a.limit).await
            })
            .await
            .context("replay failed")?;
            for e in &events {
                print_frame(a.peer.json, &ServerOp::Event(e.clone()), || {
                    format!("{} #{} {}: {}", e.conv, e.seq, e.from, e.body.as_str())
                });
            }
            print(a.peer.json, json!({ "head": head }), || {
                format!("({} entries; head {head})", events.len())
            });
        }
    }
    Ok(())
}

async fn add_peer(
    mesh: String,
    peer: String,
    groups: Vec<String>,
    public_key: Option<String>,
    token: bool,
    admin: AdminArgs,
) -> anyhow::Result<()> {
    let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
    let fail = || format!("cannot add peer {peer:?} to mesh {mesh:?}");
    let token_of = admin.admin_token.as_str();
    match public_key {
        None => {
            let t = on_any_node(&admin.http, |base| {
                let (mesh, peer, groups) = (&mesh, &peer, &groups);
                async move {
                    Admin::new(&base, token_of)
                        .add_peer(mesh, peer, groups)
                        .await
                }
            })
            .await
            .with_context(fail)?;
            print(
                admin.json,
                json!({ "mesh": mesh, "peer": peer, "token": t }),
                || t.clone(),
            );
        }
        Some(text) => {
            let key = public_key_of(&text)?;
            let t = on_any_node(&admin.http, |base| {
                let (mesh, peer, groups, key) = (&mesh, &peer, &groups, &key);
                async move {
                    Admin::new(&base, token_of)
                        .add_peer_with_key(mesh, peer, groups, key, token)
                        .await
                }
            })
            .await
            .with_context(fail)?;
            let mut v = json!({ "mesh": mesh, "peer": peer, "public_key": key });
            if let Some(t) = &t {
                v["token"] = t.clone().into();
            }
            print(admin.json, v, || match &t {
                Some(t) => format!("{t}\n(peer {peer} registered with key {key} and this token)"),
                None => format!("registered peer {peer} with key {key}"),
            });
        }
    }
    Ok(())
}

/// Runs an HTTP call against the first node of a comma-separated list of base URLs that can
/// be reached: a node that refuses the connection is passed over for the next (the request
/// never left, so nothing is done twice); any answer, or any other failure, is the result.
async fn on_any_node<T, F, Fut>(list: &str, mut call: F) -> Result<T, ClientError>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut last = None;
    for base in split_urls(list) {
        match call(base).await {
            Err(ClientError::Http(e)) if e.is_connect() => last = Some(ClientError::Http(e)),
            other => return other,
        }
    }
    Err(last.unwrap_or(ClientError::Invalid {
        code: fabric_proto::ErrorCode::BadRequest,
        message: "no --http URL given".into(),
    }))
}

/// `--public-key`: hex, or a file holding a private key file or a hex public key.
fn public_key_of(text: &str) -> anyhow::Result<String> {
    if let Ok(k) = parse_public_key(text) {
        return Ok(hex::encode(k));
    }
    let path = std::path::Path::new(text);
    if !path.is_file() {
        bail!("--public-key {text:?} is neither 64 hex characters nor a file");
    }
    let content =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    match Identity::from_file_text(&content) {
        Ok(id) => Ok(id.public_key_hex()),
        Err(_) => Ok(hex::encode(parse_public_key(&content).with_context(
            || {
                format!(
                    "{} holds neither a key file nor a public key",
                    path.display()
                )
            },
        )?)),
    }
}

async fn connect(p: &PeerArgs) -> anyhow::Result<Client> {
    let cfg = ClientConfig::new(&p.url, &p.mesh, &p.peer, p.token.as_deref().unwrap_or(""));
    let cfg = match &p.key {
        Some(path) => cfg.with_key(Identity::load(path)?),
        None if p.token.is_none() => bail!("give the peer's --token (or FABRIC_TOKEN) or --key"),
        None => cfg,
    };
    Client::connect(cfg)
        .await
        .with_context(|| format!("cannot connect to {} as {}/{}", p.url, p.mesh, p.peer))
}

// Over 70 lines: one arm per frame a tail prints.
async fn tail(a: TailArgs) -> anyhow::Result<()> {
    let client = connect(&a.peer).await?;
    if let Some(conv) = &a.conv {
        client
            .subscribe(conv, a.from)
            .await
            .context("subscribe failed")?;
    }
    let deadline = (a.timeout_secs > 0)
        .then(|| tokio::time::Instant::now() + Duration::from_secs(a.timeout_secs));
    let mut seen = 0u64;
    while a.count == 0 || seen < a.count {
        let next = match deadline {
            Some(d) => match tokio::time::timeout_at(d, client.next_delivery()).await {
                Ok(next) => next,
                Err(_) if a.count > 0 => {
                    bail!(
                        "timed out after {} s with {seen} of {} items",
                        a.timeout_secs,
                        a.count
                    )
                }
                Err(_) => break,
            },
            None => client.next_delivery().await,
        };
        let Some(item) = next else {
            bail!("the connection to the node was lost");
        };
        match &item {
            Incoming::Deliver {
                pos,
                from,
                to,
                body,
                ts,
            } => {
                // The conversation tail does not consume the inbox.
                if a.conv.is_some() {
                    continue;
                }
                let frame = ServerOp::Deliver {
                    pos: *pos,
                    from: from.clone(),
                    to: to.clone(),
                    body: body.clone(),
                    ts: *ts,
                };
                print_frame(a.peer.json, &frame, || {
                    format!("#{pos} {from} -> {}: {}", to.to_wire(), body.as_str())
                });
                client.ack(*pos).await.context("ack failed")?;
            }
            Incoming::Event {
                conv,
                seq,
                from,
                body,
                ts,
            } => {
                let frame = ServerOp::Event(DeliveredEvent {
                    conv: conv.clone(),
                    seq: *seq,
                    from: from.clone(),
                    body: body.clone(),
                    ts: *ts,
                });
                print_frame(a.peer.json, &frame, || {
                    format!("{conv} #{seq} {from}: {}", body.as_str())
                });
            }
        }
        seen += 1;
    }
    client.close().await;
    Ok(())
}

/// A command-line body: its text as it is when it is one JSON value (sent byte for byte:
/// big integers, key order and escapes unchanged), else the text as a JSON string.
fn body_of(text: &str) -> Body {
    Body::from_json_text(text.to_string()).unwrap_or_else(|_| {
        let quoted = serde_json::to_string(text).unwrap_or_else(|_| "null".into());
        Body::from_trusted(quoted.into())
    })
}

/// Prints a delivery or event: with `--json`, exactly the JSON frame the protocol defines,
/// with the body spliced in byte for byte as the node forwarded it (never parsed into a value
/// and printed again, which rounds big numbers and turns `1e999999` or lone surrogates into
/// `null`).
fn print_frame(json: bool, frame: &ServerOp, human: impl FnOnce() -> String) {
    if json {
        let mut out = Vec::with_capacity(256);
        codec::encode_server_json(frame, &mut out);
        println!("{}", String::from_utf8_lossy(&out));
    } else {
        println!("{}", human());
    }
}

fn print(json: bool, value: Value, human: impl FnOnce() -> String) {
    if json {
        println!("{value}");
    } else {
        println!("{}", human());
    }
}
