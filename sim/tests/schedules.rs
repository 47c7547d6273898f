//! Schedules as files: the hand-written ones in `sim/schedules/` (known-hard cases) pass on
//! the real cores and catch planted bugs, and a failing random run's schedule, written to a
//! file, replays the same failure from the file alone.

use fabric_sim::{replay, run, swarm, Schedule, SimOptions};
use std::path::PathBuf;

fn hand_written() -> Vec<(String, Schedule)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schedules");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("sim/schedules exists")
        .map(|e| e.expect("readable entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, Schedule::load(&p).expect("a valid schedule"))
        })
        .collect()
}

#[test]
fn hand_written_schedules_pass_on_the_real_cores() {
    // Proves the known-hard cases (crash storms, one-way partitions with crashes, full disks
    // under retention, corrupt sealed segments, clogs with reconnect storms) keep every
    // promise, and that they really inject what they say.
    let all = hand_written();
    assert!(all.len() >= 5, "found {} schedules", all.len());
    for (name, s) in all {
        let summary = replay(&s).unwrap_or_else(|v| panic!("{name}:\n{v}"));
        assert!(summary.requests_acked > 100, "{name}: {summary:?}");
        assert!(
            summary.faults_injected + summary.crashes > 0,
            "{name}: {summary:?}"
        );
    }
}

#[test]
fn planted_ack_before_fsync_is_caught_by_the_crash_storm_schedule() {
    // Proves a hand-written schedule can fail: the crash storm finds acknowledgements released
    // before their fsync, within a handful of seeds of the same schedule.
    let (_, base) = hand_written()
        .into_iter()
        .find(|(n, _)| n == "crash-storm-under-load.json")
        .expect("the crash storm schedule");
    let caught = (0..5)
        .filter(|seed| {
            let mut s = base.clone();
            s.seed = *seed;
            s.options.planted.ack_before_fsync = true;
            replay(&s).is_err()
        })
        .count();
    assert!(caught >= 3, "caught in {caught} of 5 seeds");
}

#[test]
fn a_failing_run_replays_from_its_schedule_file() {
    // Proves the failure report is complete: the schedule a failing random run applied,
    // written to a file and read back, reproduces the same violation, message and last events
    // with nothing else given.
    let options = SimOptions {
        planted: fabric_shard::PlantedBugs {
            ack_before_fsync: true,
            ..Default::default()
        },
        ..swarm(0)
    };
    let (seed, violation) = (0..100)
        .find_map(|seed| {
            let mut o = swarm(seed);
            o.planted = options.planted;
            run(seed, &o).err().map(|v| (seed, v))
        })
        .expect("a failing seed");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join(format!("seed-{seed}.json"));
    violation.schedule.save(&path).expect("written");
    let again = replay(&Schedule::load(&path).expect("read back")).expect_err("fails again");
    assert_eq!(
        (again.kind, &again.message, &again.last_events),
        (violation.kind, &violation.message, &violation.last_events)
    );
}
