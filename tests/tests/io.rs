//! Task inputs and outputs end to end with the real binaries: files and a directory shipped
//! into the workspace (a fresh copy for each retry), outputs collected when the attempt ends
//! (failed attempts included), stored on the coordinator, and fetched byte-identical with
//! `drover outputs`; inputs over the limit refused with nothing queued; a glob that matches
//! nothing still lets the task complete, and says so.
//!
//! Running tasks needs the sandbox (namespaces and cgroups), so those tests need root; without
//! it they print a loud SKIPPED line and pass. CI runs as root.

use drover_protocol::task::{TaskInfo, TaskState};
use drover_tests::{events, of_kind, root_or_skip, submit, TestFleet, DEADLINE};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn wait_final(fleet: &TestFleet, id: &str) -> TaskInfo {
    fleet.wait_for(DEADLINE, &format!("task {id} to end"), || {
        match fleet.try_cli_json::<TaskInfo>(&["task", "show", id, "--json"]) {
            Ok(t) if t.state.is_final() => Ok(t),
            Ok(t) => Err(format!("{} (attempts {})", t.state, t.attempts)),
            Err(e) => Err(e),
        }
    })
}

fn kinds_of_epoch(events: &[Value], epoch: u64) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["epoch"] == epoch && e["seq"].is_u64())
        .map(|e| e["kind"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// Bytes that span several transfer chunks (256 KiB) and every byte value.
fn binary(len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 31 + i / 7) % 256) as u8).collect()
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().expect("has a parent")).expect("mkdir");
    std::fs::write(path, bytes).expect("write");
}

const WORDS: &str = "alpha\nbeta\ngamma\n";

/// Attempt 1 checks its inputs, writes outputs, then spoils its inputs and fails; attempt 2
/// checks it got a fresh, unspoiled copy and writes its own outputs.
const SCRIPT: &str = r##"
set -e
test "$(cat words.txt)" = "$(printf 'alpha\nbeta\ngamma')"
test -f assets/sub/deep.txt
test -f assets/img.bin
test ! -e assets/leak
test "$(readlink assets/alias)" = "sub/deep.txt"
test ! -e spoiled
mkdir -p out
cp assets/img.bin out/img.bin
tr a-z A-Z < words.txt > out/upper.txt
echo "$DROVER_ATTEMPT" > out/attempt.txt
echo "# report of attempt $DROVER_ATTEMPT" > report.md
ln -s /etc/passwd out/leak
if [ "$DROVER_ATTEMPT" = 1 ]; then
  echo dirty >> words.txt; rm assets/sub/deep.txt; touch spoiled; exit 3
fi
"##;

#[test]
fn inputs_ship_fresh_per_attempt_and_outputs_come_back_byte_identical() {
    if !root_or_skip("inputs_ship_fresh_per_attempt_and_outputs_come_back_byte_identical") {
        return;
    }
    let mut fleet = TestFleet::started(1);
    let job = fleet.dir().join("job");
    let img = binary(700 * 1024 + 13);
    write(&job.join("data/words.txt"), WORDS.as_bytes());
    write(&job.join("assets/img.bin"), &img);
    write(&job.join("assets/sub/deep.txt"), b"deep\n");
    std::os::unix::fs::symlink("/etc/hostname", job.join("assets/leak")).expect("symlink");
    std::os::unix::fs::symlink("sub/deep.txt", job.join("assets/alias")).expect("symlink");
    let spec = job.join("io.toml");
    let toml = format!(
        "name = \"io\"\ncommand = [\"sh\", \"-c\", {SCRIPT:?}]\ninputs = [\"data/words.txt\", \"assets\"]\n\
         outputs = [\"out/\", \"*.md\"]\n[retry]\nmax_attempts = 2\nbackoff = \"100ms\"\n"
    );
    std::fs::write(&spec, toml).expect("write spec");

    let out = fleet.cli(&["submit", spec.to_str().expect("utf-8")]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("not shipping") && stderr.contains("leak"),
        "the escaping symlink is left out, and the submitter told: {stderr}"
    );
    let id = stdout.trim().to_owned();
    let t = wait_final(&fleet, &id);
    let all = events(&fleet, &id, &[]);
    assert_eq!(
        (t.state, t.attempts),
        (TaskState::Succeeded, 2),
        "{t:?}\n{all:#?}\n{}",
        fleet.log_tail()
    );

    // Each attempt: inputs unpacked before it started, outputs stored before `exited`.
    for epoch in [1, 2] {
        let k = kinds_of_epoch(&all, epoch);
        let pos = |kind: &str| k.iter().position(|x| x == kind);
        assert!(pos("inputs_unpacked") < pos("exited"), "{k:?}");
        assert!(
            pos("outputs_stored").is_some() && pos("outputs_stored") < pos("exited"),
            "{k:?}"
        );
    }
    let unpacked = of_kind(&all, "inputs_unpacked");
    assert_eq!(unpacked[0]["payload"]["files"], 3, "{unpacked:?}");
    let stored = of_kind(&all, "outputs_stored");
    assert_eq!(stored.len(), 2, "the failed attempt's outputs are kept too");
    let last = &stored[1]["payload"];
    assert_eq!(last["files"], 4, "{last}");
    let skipped = last["skipped"].to_string();
    assert!(
        skipped.contains("out/leak") && skipped.contains("outside the workspace"),
        "{skipped}"
    );

    // The last attempt's outputs, byte-identical.
    let dest = fleet.dir().join("fetched");
    let out = fleet.cli(&["outputs", &id, "--dest", dest.to_str().expect("utf-8")]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("wrote 4 files"), "{stdout}");
    assert!(stdout.contains("from attempt 2"), "{stdout}");
    assert_eq!(std::fs::read(dest.join("out/img.bin")).expect("img"), img);
    assert_eq!(
        std::fs::read_to_string(dest.join("out/upper.txt")).expect("upper"),
        WORDS.to_uppercase()
    );
    assert_eq!(
        std::fs::read_to_string(dest.join("out/attempt.txt")).expect("attempt"),
        "2\n"
    );
    assert_eq!(
        std::fs::read_to_string(dest.join("report.md")).expect("report"),
        "# report of attempt 2\n"
    );
    assert!(!dest.join("out/leak").exists());

    // Again into the same place: refused, nothing changed; with --force, replaced.
    std::fs::write(dest.join("report.md"), "mine").expect("write");
    let out = fleet.cli(&["outputs", &id, "--dest", dest.to_str().expect("utf-8")]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("already exist") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(dest.join("report.md")).expect("r"),
        "mine"
    );
    let out = fleet.cli(&[
        "outputs",
        &id,
        "--dest",
        dest.to_str().expect("utf-8"),
        "--force",
    ]);
    assert!(out.status.success(), "{}", text(&out).1);
    assert_eq!(
        std::fs::read_to_string(dest.join("report.md")).expect("r"),
        "# report of attempt 2\n"
    );

    // The failed first attempt's evidence, by number, as JSON.
    let first = fleet.dir().join("first");
    let got: Value = fleet.cli_json(&[
        "outputs",
        &id,
        "--attempt",
        "1",
        "--dest",
        first.to_str().expect("utf-8"),
        "--json",
    ]);
    assert_eq!(got["attempt"], 1);
    assert_eq!(got["files"].as_array().map(Vec::len), Some(4), "{got}");
    assert_eq!(
        std::fs::read_to_string(first.join("out/attempt.txt")).expect("a"),
        "1\n"
    );

    // `task show` lists them; an attempt that stored nothing is a clear error.
    let shown: Value = fleet.cli_json(&["task", "show", &id, "--json"]);
    assert_eq!(
        shown["outputs"].as_array().map(Vec::len),
        Some(2),
        "{shown}"
    );
    assert_eq!(shown["outputs"][1]["files"], 4);
    let human = text(&fleet.cli(&["task", "show", &id])).0;
    assert!(human.contains("attempt 2: 4 files"), "{human}");
    let out = fleet.cli(&["outputs", &id, "--attempt", "7", "--dest", "/nonexistent"]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("attempt 7") && stderr.contains("attempts with outputs: 1, 2"),
        "{stderr}"
    );

    // Stored outputs survive a coordinator crash.
    fleet.stop_coordinator(nix::sys::signal::Signal::SIGKILL);
    fleet.start_coordinator_and_wait();
    let again = fleet.dir().join("after-restart");
    let out = fleet.cli(&["outputs", &id, "--dest", again.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", text(&out).1);
    assert_eq!(std::fs::read(again.join("out/img.bin")).expect("img"), img);
}

#[test]
fn inputs_over_the_limit_are_refused_and_nothing_is_queued() {
    let mut fleet = TestFleet::new(0);
    fleet.start_coordinator_and_wait();
    let job = fleet.dir().join("big");
    std::fs::create_dir_all(job.join("data")).expect("mkdir");
    // Sparse: no disk used, 65 MiB as the limit sees it.
    std::fs::File::create(job.join("data/huge.bin"))
        .and_then(|f| f.set_len(65 << 20))
        .expect("sparse file");
    let spec = job.join("big.toml");
    std::fs::write(
        &spec,
        "name = \"big\"\ncommand = [\"true\"]\ninputs = [\"data\"]\n",
    )
    .expect("spec");
    let out = fleet.cli(&["submit", spec.to_str().expect("utf-8")]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(64), "{stdout}{stderr}");
    assert!(stderr.contains("over the 64 MiB limit"), "{stderr}");
    assert!(stderr.contains("at least 65 MiB"), "{stderr}");
    assert!(stdout.is_empty(), "no id printed: {stdout}");
    let tasks: Vec<TaskInfo> = fleet.cli_json(&["tasks", "--json"]);
    assert!(tasks.is_empty(), "nothing queued: {tasks:?}");
}

#[test]
fn outputs_that_match_nothing_still_complete_and_say_so() {
    if !root_or_skip("outputs_that_match_nothing_still_complete_and_say_so") {
        return;
    }
    let fleet = TestFleet::started(1);
    let spec: PathBuf = fleet.dir().join("empty.toml");
    std::fs::write(
        &spec,
        "name = \"empty\"\ncommand = [\"true\"]\noutputs = [\"results/*.json\"]\n",
    )
    .expect("spec");
    let id = submit(&fleet, &spec);
    let t = wait_final(&fleet, &id);
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}");
    let all = events(&fleet, &id, &[]);
    let stored = of_kind(&all, "outputs_stored");
    assert_eq!(stored.len(), 1, "{all:#?}");
    let p = &stored[0]["payload"];
    assert_eq!(p["files"], 0);
    assert_eq!(p["unmatched"][0], "results/*.json");
    assert!(
        p["note"].as_str().unwrap_or("").contains("no file matched"),
        "{p}"
    );
    let dest = fleet.dir().join("none");
    let out = fleet.cli(&["outputs", &id, "--dest", dest.to_str().expect("utf-8")]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("stored no files"), "{stdout}");

    // A task without outputs, and one that does not exist: clear errors, exit 1.
    let plain = fleet.dir().join("plain.toml");
    std::fs::write(&plain, "name = \"plain\"\ncommand = [\"true\"]\n").expect("spec");
    let plain_id = submit(&fleet, &plain);
    wait_final(&fleet, &plain_id);
    let out = fleet.cli(&[
        "outputs",
        &plain_id,
        "--dest",
        dest.to_str().expect("utf-8"),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).1.contains("declares no outputs"),
        "{}",
        text(&out).1
    );
    let out = fleet.cli(&["outputs", "t999", "--dest", dest.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("no task"), "{}", text(&out).1);
}

/// One 512-byte tar header for a regular file, written by hand with no checks at all, the way
/// a hostile client would.
fn raw_tar_entry(out: &mut Vec<u8>, name: &str, data: &[u8]) {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{:011o}\0", data.len()).as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

#[test]
fn a_hostile_inputs_archive_is_refused_by_the_coordinator_and_nothing_is_queued() {
    let mut fleet = TestFleet::new(0);
    fleet.start_coordinator_and_wait();
    let mut archive = Vec::new();
    raw_tar_entry(&mut archive, "ok.txt", b"fine");
    raw_tar_entry(&mut archive, "../../escape.txt", b"evil");
    archive.extend_from_slice(&[0u8; 1024]);
    let path = fleet.dir().join("hostile.tar");
    std::fs::write(&path, &archive).expect("write archive");
    let spec: drover_protocol::task::TaskSpec = serde_json::from_value(serde_json::json!({
        "name": "hostile", "command": ["true"], "inputs": ["ok.txt"]
    }))
    .expect("spec");
    let paths = fleet.cert_paths("operator");
    let settings = drover::cli::settings::Resolved {
        coordinator: fleet.addr(),
        server_name: drover_protocol::identity::COORDINATOR_SERVER_NAME.into(),
        ca: fleet.ca_cert(),
        cert: paths.cert,
        key: paths.key,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (with_archive, without) = rt.block_on(async {
        let mut client = drover::cli::client::OperatorClient::connect(&settings)
            .await
            .expect("connect");
        let mut file = tokio::fs::File::open(&path).await.expect("open");
        let len = archive.len() as u64;
        let with_archive = client.submit(spec.clone(), Some((&mut file, len))).await;
        // The same spec without its archive is refused too: inputs are never silently missing.
        let without = client.submit(spec, None).await;
        client.close().await;
        (with_archive, without)
    });
    let err = with_archive.expect_err("a hostile archive is refused");
    assert_eq!(err.code, 2, "{}", err.message);
    assert!(
        err.message.contains("\"..\"") && err.message.contains("nothing was queued"),
        "{}",
        err.message
    );
    let err = without.expect_err("inputs without an archive are refused");
    assert!(
        err.message.contains("no inputs archive came with it"),
        "{}",
        err.message
    );
    let tasks: Vec<TaskInfo> = fleet.cli_json(&["tasks", "--json"]);
    assert!(tasks.is_empty(), "nothing queued: {tasks:?}");
    let stored = std::fs::read_dir(fleet.dir().join("state/blobs/sha256"))
        .expect("blob dir")
        .count();
    assert_eq!(stored, 0, "nothing stored");
}

#[test]
fn an_attempt_whose_inputs_cannot_be_had_fails_with_the_reason() {
    if !root_or_skip("an_attempt_whose_inputs_cannot_be_had_fails_with_the_reason") {
        return;
    }
    // No worker yet: the task waits while its stored archive is lost under the coordinator.
    let mut fleet = TestFleet::new(1);
    fleet.start_coordinator_and_wait();
    let job = fleet.dir().join("lost");
    write(&job.join("in.txt"), b"data");
    let spec = job.join("lost.toml");
    std::fs::write(
        &spec,
        "name = \"lost\"\ncommand = [\"cat\", \"in.txt\"]\ninputs = [\"in.txt\"]\n[retry]\nmax_attempts = 1\n",
    )
    .expect("spec");
    let id = submit(&fleet, &spec);
    let blobs = fleet.dir().join("state/blobs/sha256");
    for blob in std::fs::read_dir(&blobs).expect("blob dir") {
        std::fs::remove_file(blob.expect("entry").path()).expect("remove blob");
    }
    fleet.start_all_workers();
    let t = wait_final(&fleet, &id);
    assert_eq!(t.state, TaskState::Failed, "{t:?}");
    let all = events(&fleet, &id, &[]);
    let exited = of_kind(&all, "exited");
    let error = exited[0]["payload"]["error"].as_str().unwrap_or("");
    assert!(
        error.contains("inputs") && error.contains("missing on the coordinator"),
        "{exited:?}"
    );
    assert!(of_kind(&all, "stdout").is_empty(), "the command never ran");
}
