//! `fabric serve`'s settings have one set of names: each configuration key `k` is the TOML key
//! `k`, the flag `--k-with-dashes` and the variable `FABRIC_K_UPPERCASE`, and
//! docs/OPERATIONS.md's table says so, with each limit's default and range as the node has them.

use super::*;
use clap::CommandFactory;

/// The `serve` subcommand as clap sees it.
fn serve_command() -> clap::Command {
    Cli::command()
        .find_subcommand("serve")
        .expect("a serve subcommand")
        .clone()
}

/// Every key of the configuration: those it serialises, and the options unset by default
/// (which are not serialised).
fn config_keys() -> Vec<String> {
    let value = toml::Value::try_from(Config::default()).expect("serialisable");
    let mut keys: Vec<String> = value.as_table().expect("a table").keys().cloned().collect();
    let unset = [
        "admin_token",
        "worker_threads",
        "metrics_listen",
        "quic_listen",
        "tls_cert",
        "tls_key",
    ];
    keys.extend(unset.map(String::from));
    keys
}

/// docs/OPERATIONS.md's settings table, one row per key: its cells, backticks removed.
fn documented_rows() -> Vec<Vec<String>> {
    let doc = include_str!("../../docs/OPERATIONS.md");
    doc.lines()
        .skip_while(|l| !l.starts_with("| `data_dir`"))
        .take_while(|l| l.starts_with("| `"))
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().replace('`', ""))
                .collect()
        })
        .collect()
}

fn flag_of(key: &str) -> String {
    key.replace('_', "-")
}

fn variable_of(key: &str) -> String {
    format!("FABRIC_{}", key.to_uppercase())
}

#[test]
fn every_config_key_has_a_flag_and_a_variable_of_its_name() {
    // Proves each key the node reads from TOML can also be set by `--flag` and `FABRIC_*`
    // under the same name (e.g. `push_credit_frames_max`, once a TOML key only).
    let cmd = serve_command();
    for key in config_keys() {
        let arg = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(flag_of(&key).as_str()))
            .unwrap_or_else(|| panic!("no flag --{} for key {key}", flag_of(&key)));
        let env = arg.get_env().and_then(|e| e.to_str()).unwrap_or_default();
        assert_eq!(env, variable_of(&key), "variable of {key}");
    }
}

#[test]
fn every_limit_flag_reaches_the_config() {
    // Proves `into_config` copies every limit's flag into the configuration (a flag that
    // parses but is never applied would silently keep the default).
    for e in Config::default().limits().entries() {
        let v = match e.value.checked_sub(1) {
            Some(v) if e.range.contains(v) => v,
            _ => e.value + 1,
        };
        let flag = format!("--{}", flag_of(e.key));
        let cli = Cli::try_parse_from(["fabric", "serve", &flag, &v.to_string()])
            .unwrap_or_else(|err| panic!("{flag} {v}: {err}"));
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        let c = args
            .into_config()
            .unwrap_or_else(|err| panic!("{flag} {v}: {err}"));
        let got = c.limits().entries().into_iter().find(|g| g.key == e.key);
        assert_eq!(got.map(|g| g.value), Some(v), "{flag}");
    }
}

#[test]
fn the_docs_table_agrees_with_the_server() {
    // Proves docs/OPERATIONS.md lists every key once with the server's flag and variable, and
    // each limit with the default and range `Limits` has (shards' default is derived: one
    // per core).
    let rows = documented_rows();
    let keys = config_keys();
    assert_eq!(rows.len(), keys.len(), "one row per key");
    let limits = Config::default().limits();
    let entries = limits.entries();
    for row in &rows {
        let [key, flag, variable, default, range, _meaning] = &row[..] else {
            panic!("a row of six cells: {row:?}")
        };
        assert!(keys.contains(key), "documented key {key} is a config key");
        assert_eq!(flag, &format!("--{}", flag_of(key)), "flag of {key}");
        assert_eq!(variable, &variable_of(key), "variable of {key}");
        match entries.iter().find(|e| e.key == key) {
            Some(e) if key == "shards" => assert_eq!(range, &e.range.to_string()),
            Some(e) => {
                assert_eq!(default, &e.value.to_string(), "default of {key}");
                assert_eq!(range, &e.range.to_string(), "range of {key}");
            }
            None => assert_eq!(range, "—", "{key} is not a limit"),
        }
    }
}

#[test]
fn serve_refuses_limits_that_do_not_fit_together_naming_both() {
    // Proves `fabric serve` stops before starting a node when two limits break a relation,
    // with both limits and their values in the error it prints.
    let cli = Cli::try_parse_from(["fabric", "serve", "--shards", "8", "--partitions", "4"])
        .expect("parses");
    let Command::Serve(args) = cli.command else {
        panic!("not serve")
    };
    let e = args.into_config().expect_err("refused").to_string();
    assert!(e.contains("partitions 4") && e.contains("shards 8"), "{e}");
}
