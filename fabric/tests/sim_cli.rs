//! `fabric sim` as a user runs it: one seed, many seeds with a summary, a planted bug that
//! fails with a schedule file, and the replay of that file.

use std::process::Command;

fn fabric() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fabric"))
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn sim_seed_passes_and_prints_its_seed_line() {
    // Proves `fabric sim --seed N` runs the real cores for a simulated minute, prints the SEED=
    // line with every option, and exits 0; `--trace` prints one line per event with its time.
    let out = fabric().args(["sim", "--seed", "3"]).output().unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.starts_with("SEED=3 nodes=1 "), "{text}");
    assert!(text.contains("\nok: "), "{text}");
    let traced = fabric()
        .args(["sim", "--seed", "3", "--trace"])
        .output()
        .unwrap();
    let lines = stdout(&traced);
    assert!(lines.lines().count() > 100, "{lines}");
    assert!(lines.contains("ms setup done"), "{lines}");
}

#[test]
fn sim_seeds_prints_a_summary_table() {
    // Proves `fabric sim --seeds COUNT` runs them all and reports seeds, simulated time,
    // faults and violations.
    let out = fabric()
        .args(["sim", "--seeds", "20", "--first", "100"])
        .output()
        .unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    for row in [
        "seeds run                20 (100..120)",
        "violations               0",
        "failing seeds            none",
        "simulated time",
        "faults injected",
        "seeds per second",
    ] {
        assert!(text.contains(row), "missing {row:?} in\n{text}");
    }
}

#[test]
fn sim_planted_bug_fails_writes_a_schedule_and_replays() {
    // Proves the failure path end to end: a planted bug makes `fabric sim` exit 1 with the
    // violation, every failing seed listed in the summary, and a schedule file, and `fabric sim replay FILE` reproduces the violation
    // from the file alone.
    let dir = tempfile::tempdir().unwrap();
    let out = fabric()
        .args([
            "sim",
            "--seeds",
            "30",
            "--planted",
            "ack_before_fsync",
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("violation NotDurable"), "{text}");
    let listed = text
        .lines()
        .find(|l| l.starts_with("failing seeds"))
        .expect("a failing seeds row");
    assert!(listed.contains(" (NotDurable)"), "{listed}");
    let file = std::fs::read_dir(dir.path())
        .unwrap()
        .next()
        .expect("a schedule file")
        .unwrap()
        .path();
    let replayed = fabric()
        .args(["sim", "replay"])
        .arg(&file)
        .output()
        .unwrap();
    let again = stdout(&replayed);
    assert_eq!(replayed.status.code(), Some(1), "{again}");
    assert!(again.contains("violation NotDurable"), "{again}");
    let bad = fabric()
        .args(["sim", "--seed", "1", "--planted", "no_such_bug"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown planted bug"));
}

#[test]
fn sim_help_lists_every_planted_bug_and_serve_takes_none() {
    // Proves every planted bug the simulator knows is named in `fabric sim --help`, and that
    // `fabric serve` has no way to plant one.
    let help = stdout(&fabric().args(["sim", "--help"]).output().unwrap());
    let all = fabric_sim::options::planted_names::ALL;
    for name in all
        .iter()
        .chain(&fabric_sim::options::planted_names::glue::ALL)
    {
        assert!(help.contains(name), "{name} missing from --help");
    }
    let serve = stdout(&fabric().args(["serve", "--help"]).output().unwrap());
    assert!(!serve.contains("planted"), "{serve}");
}
