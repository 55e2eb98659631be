//! Issue 8's secrets end to end with the real `drover` and `drover-worker` binaries: a secret
//! stored with `drover secret set` is used by a sandboxed task through the worker's egress
//! proxy — an HTTPS API that demands it, and git clone and push over HTTPS — while every
//! exfiltration probe from inside the sandbox finds nothing, and a canary value appears in no
//! event, log, database file or spool.
//!
//! The upstream is a local HTTPS server (`drover_tests::upstream`) that answers only requests
//! carrying `Authorization: Bearer <secret>` and serves git through the real
//! `git http-backend`. The worker trusts its CA through `egress.upstream_ca`.
//!
//! Tests that run tasks need root (namespaces, cgroups) and print a loud SKIPPED line
//! without it; the CLI test needs no root. Fleets live under /var/tmp (a fleet under /tmp
//! would be hidden from the task by its private /tmp whatever the sandbox did).

use base64::Engine;
use drover_protocol::task::{TaskInfo, TaskState};
use drover_protocol::SecretInfo;
use drover_tests::upstream::Upstream;
use drover_tests::{events, of_kind, output, root_or_skip, TestFleet, DEADLINE};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const FLEET_PARENT: &str = "/var/tmp";
const TASK_DEADLINE: Duration = Duration::from_secs(120);

fn canary() -> String {
    format!("drover-canary-{:032x}", rand::random::<u128>())
}

/// A fleet with one worker `w1` whose proxy trusts `upstream`'s CA; started and ready.
fn fleet_for(upstream_ca: &Path, fleet: &mut TestFleet) {
    let config = fleet.worker_config("w1");
    let mut text = std::fs::read_to_string(&config).expect("worker config");
    text.push_str(&format!(
        "\n[egress]\nupstream_ca = [{:?}]\n",
        upstream_ca.display().to_string()
    ));
    std::fs::write(&config, text).expect("write worker config");
    fleet.start_coordinator();
    fleet.start_all_workers();
    fleet.wait_all_ready();
}

fn new_fleet() -> TestFleet {
    TestFleet::builder()
        .in_dir(Path::new(FLEET_PARENT))
        .worker("w1", &["test"])
        .build()
}

/// `drover secret set NAME` with `value` on stdin.
fn set_secret(fleet: &TestFleet, name: &str, value: &str) -> std::process::Output {
    let paths = fleet.cert_paths("operator");
    let mut child = drover_tests::command(&drover_tests::bin("drover"), fleet.dir())
        .args([
            "secret",
            "set",
            name,
            "--json",
            "--coordinator",
            &fleet.addr(),
        ])
        .arg("--ca")
        .arg(fleet.ca_cert())
        .arg("--cert")
        .arg(&paths.cert)
        .arg("--key")
        .arg(&paths.key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run drover secret set");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{value}\n").as_bytes())
        .expect("write the value");
    child.wait_with_output().expect("drover secret set")
}

fn write_spec(fleet: &TestFleet, name: &str, spec: &Value) -> PathBuf {
    let path = fleet.dir().join(format!("{name}.json"));
    std::fs::write(&path, spec.to_string()).expect("write spec");
    path
}

fn run(fleet: &TestFleet, name: &str, spec: &Value) -> (TaskInfo, Vec<Value>) {
    let path = write_spec(fleet, name, spec);
    let id = drover_tests::submit(fleet, &path);
    let t = fleet.wait_for(
        TASK_DEADLINE,
        &format!("task {id} to end"),
        || match drover_tests::task(fleet, &id) {
            Ok(t) if t.state.is_final() => Ok(t),
            Ok(t) => Err(format!("{}", t.state)),
            Err(e) => Err(e),
        },
    );
    (t, events(fleet, &id, &[]))
}

fn stdout(events: &[Value]) -> String {
    output(events, "stdout")
}

/// A sandboxed task in the proxy network, granted `gh` for the upstream.
fn proxied_spec(name: &str, upstream: &Upstream, script: &str) -> Value {
    json!({
        "name": name,
        "command": ["sh", "-c", script],
        "env": {
            "HOME": "/tmp",
            "GIT_AUTHOR_NAME": "agent", "GIT_AUTHOR_EMAIL": "agent@example.invalid",
            "GIT_COMMITTER_NAME": "agent", "GIT_COMMITTER_EMAIL": "agent@example.invalid",
        },
        "requirements": { "cpus": 0 },
        "retry": { "max_attempts": 1 },
        "network": "proxy",
        "egress": [upstream.host()],
        "secrets": [{ "name": "gh", "hosts": [upstream.host()] }],
    })
}

/// Every file under `dir` (recursively) whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let contains = |p: &Path| {
                std::fs::read(p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle))
            };
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(t) if t.is_file() && contains(&p) => hits.push(p),
                _ => {}
            }
        }
    }
    hits
}

fn git(dir: &Path, home: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=test",
            "-c",
            "user.email=test@example.invalid",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .env("HOME", home)
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A bare repository `project.git` on the upstream with one commit (README).
fn seed_repo(upstream: &Upstream, home: &Path) {
    let bare = upstream.repos.join("project.git");
    git(
        &upstream.repos,
        home,
        &["init", "--bare", "-q", "project.git"],
    );
    git(&bare, home, &["config", "http.receivepack", "true"]);
    let work = home.join("seed");
    std::fs::create_dir_all(&work).expect("seed dir");
    git(&work, home, &["init", "-q"]);
    std::fs::write(work.join("README"), "seeded by the test\n").expect("README");
    git(&work, home, &["add", "README"]);
    git(&work, home, &["commit", "-q", "-m", "seed"]);
    git(
        &work,
        home,
        &["push", "-q", bare.to_str().expect("utf-8"), "HEAD:main"],
    );
}

/// A started one-worker fleet whose proxy trusts a fresh upstream (with `project.git` when
/// `git`), and a canary secret stored as `gh`: (fleet, its directory, upstream, secret).
fn proxied_fleet(git: bool) -> (TestFleet, PathBuf, Upstream, String) {
    let secret = canary();
    let mut fleet = new_fleet();
    let fleet_dir = fleet.dir().canonicalize().expect("fleet dir");
    let upstream = Upstream::start(&fleet_dir, &secret);
    if git {
        seed_repo(&upstream, &fleet_dir);
    }
    fleet_for(&upstream.ca_file, &mut fleet);
    let out = set_secret(&fleet, "gh", &secret);
    assert!(
        out.status.success(),
        "secret set: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&secret));
    (fleet, fleet_dir, upstream, secret)
}

#[test]
fn a_granted_secret_works_through_the_proxy_and_is_found_nowhere() {
    if !root_or_skip("a_granted_secret_works_through_the_proxy_and_is_found_nowhere") {
        return;
    }
    let (mut fleet, fleet_dir, upstream, secret) = proxied_fleet(true);

    let worker_pid = fleet.worker_process("w1").id();
    let state = fleet_dir.join("state");
    let tls = fleet_dir.join("tls");
    let port = upstream.port;
    // Each probe prints a marker line the test reads back. A probe that found the secret
    // would print it, and the redactor would turn it into `[REDACTED:gh]`: so the session must
    // hold neither the value nor that marker.
    let script = format!(
        r#"
echo "== api"; curl -sS --max-time 20 https://localhost:{port}/hello
echo "== clone"; git clone -q https://localhost:{port}/git/project.git && cat project/README
cd project && echo "pushed from the sandbox" > FROM_TASK && git add FROM_TASK \
  && git commit -q -m "from the task" && git push -q origin HEAD:main && echo "push ok"; cd ..
echo "== env"; env
echo "== environ"; cat /proc/*/environ 2>/dev/null | tr '\0' '\n'
echo "== cmdline"; cat /proc/*/cmdline 2>/dev/null | tr '\0' ' '; echo
echo "== mounts"; cat /proc/self/mountinfo
echo "== files"; cat {state}/secrets.key {state}/drover.db {state}/drover.db-wal {tls}/w1.key 2>&1 | head -c 300; echo
timeout 60 grep -ral -e "{probe_prefix}" {fleet} /etc /run /root /home /tmp /var/lib /var/log 2>/dev/null | head -5
echo "== worker proc"; ls /proc/{worker_pid} 2>&1 | head -2
echo "== ptrace"; perl -e 'my %nr=(x86_64=>101,aarch64=>117); my $m=`uname -m`; chomp $m; my $r=syscall($nr{{$m}}, 16, {worker_pid}, 0, 0); print "ptrace=$r errno=", $!+0, "\n"'
echo "== direct"; curl -sS --noproxy '*' --max-time 5 https://localhost:{port}/hello 2>&1 | head -2
echo "== other host"; curl -sS -o /dev/null -w "%{{http_code}}\n" --max-time 10 https://example.com/ 2>&1 | tail -1
echo "== end"
"#,
        state = state.display(),
        tls = tls.display(),
        probe_prefix = "drover-canary-",
        fleet = fleet_dir.display(),
    );
    let (t, all) = run(&fleet, "probe", &proxied_spec("probe", &upstream, &script));
    let out = stdout(&all);
    let session = serde_json::to_string(&all).expect("session as JSON");
    assert_eq!(t.state, TaskState::Succeeded, "{t:?}\n{out}");
    assert!(out.contains("== end"), "{out}");

    // Through the proxy the credential works: the API and git clone and push.
    let section = |name: &str| -> String {
        out.split(&format!("== {name}\n"))
            .nth(1)
            .and_then(|s| s.split("\n== ").next())
            .unwrap_or("")
            .to_owned()
    };
    assert_eq!(section("api").trim(), "welcome, agent", "{out}");
    assert!(section("clone").contains("seeded by the test"), "{out}");
    assert!(section("clone").contains("push ok"), "{out}");
    let log = Command::new("git")
        .args([
            "--git-dir",
            upstream.repos.join("project.git").to_str().unwrap(),
        ])
        .args(["log", "--format=%s", "main"])
        .output()
        .expect("git log");
    assert!(
        String::from_utf8_lossy(&log.stdout).contains("from the task"),
        "the push did not reach the upstream"
    );
    let seen = upstream.seen();
    assert!(
        seen.iter().any(|s| s.path == "/hello" && s.authorized),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|s| s.path.ends_with("git-receive-pack") && s.method == "POST" && s.authorized),
        "{seen:?}"
    );

    let shown = fleet.cli(&["task", "show", &t.id]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains(&format!("Secrets:   gh for {}", upstream.host()))
            && shown.contains(&format!("Network:   proxy to {}", upstream.host())),
        "{shown}"
    );

    // Nothing from inside finds it, and nothing went around the proxy.
    assert!(!session.contains(&secret), "the secret is in the session");
    assert!(
        !session.contains("[REDACTED:gh]"),
        "a probe found the secret (the redactor masked it): {out}"
    );
    assert!(
        section("env").contains("HTTPS_PROXY=http://127.0.0.1:3128"),
        "{out}"
    );
    assert!(
        !section("files").contains("SQLite"),
        "the database was readable: {out}"
    );
    assert!(
        section("worker proc").contains("No such file"),
        "the worker's /proc entry is visible: {out}"
    );
    assert!(
        section("ptrace").contains("ptrace=-1 errno=3"),
        "ptrace of the worker did not fail with ESRCH: {out}"
    );
    let direct = section("direct");
    assert!(
        direct.contains("Couldn't connect") || direct.contains("Failed to connect"),
        "a direct connection to the upstream was not refused: {out}"
    );
    assert_eq!(section("other host").trim(), "000", "{out}");

    // The session records the grant and every use, never the value; the refusal too.
    let granted = of_kind(&all, "secret_granted");
    assert_eq!(granted.len(), 1, "{session}");
    let used = of_kind(&all, "secret_used");
    assert!(
        used.len() >= 3,
        "api, clone and push each use it: {session}"
    );
    for u in &used {
        assert_eq!(u["payload"]["name"], "gh");
        assert_eq!(u["payload"]["host"], "localhost");
    }
    let denied = of_kind(&all, "egress_denied");
    assert!(
        denied.iter().any(|d| d["payload"]["host"] == "example.com"),
        "{session}"
    );

    // A canary search across everything drover wrote: logs, database, spools, workspaces.
    let b64 = base64::engine::general_purpose::STANDARD.encode(&secret);
    for needle in [secret.as_bytes(), b64.as_bytes()] {
        let hits = files_containing(&fleet_dir, needle);
        let hits: Vec<_> = hits
            .into_iter()
            .filter(|p| !p.starts_with(&upstream.repos))
            .collect();
        assert!(hits.is_empty(), "the secret was found in {hits:?}");
    }
}

#[test]
fn a_secret_reflected_by_an_upstream_is_masked_in_every_form() {
    if !root_or_skip("a_secret_reflected_by_an_upstream_is_masked_in_every_form") {
        return;
    }
    let (fleet, fleet_dir, upstream, secret) = proxied_fleet(false);
    // A careless upstream echoes the Authorization header; the task prints it as it is,
    // base64-encoded, split across two writes a moment apart, to stderr, and in a structured
    // event. Every form must be masked before anything is stored.
    let script = format!(
        r#"
r=$(curl -sS --max-time 20 https://localhost:{port}/echo-auth)
echo "$r"
printf '%s' "$r" | base64 -w0; echo
tok=${{r#*Bearer }}; half=${{#tok}}; half=$((half / 2))
printf '%s' "$(printf '%s' "$tok" | cut -c1-$half)"; sleep 0.3; printf '%s\n' "$(printf '%s' "$tok" | cut -c$((half + 1))-)"
echo "to stderr: $tok" >&2
printf '{{"type":"custom","token":"%s"}}\n' "$tok" >&"$DROVER_EVENTS_FD"
"#,
        port = upstream.port
    );
    let (t, all) = run(
        &fleet,
        "reflect",
        &proxied_spec("reflect", &upstream, &script),
    );
    assert_eq!(t.state, TaskState::Succeeded, "{t:?} {all:#?}");
    let session = serde_json::to_string(&all).expect("session");
    assert!(!session.contains(&secret), "unmasked: {session}");
    // Base64 of a longer text holds, at one of three alignments, characters that depend on
    // the secret alone: none of them may be stored.
    for offset in 0..3usize {
        let mut padded = vec![b'x'; offset];
        padded.extend_from_slice(secret.as_bytes());
        let encoded = base64::engine::general_purpose::STANDARD.encode(&padded);
        let fragment = &encoded[(offset * 8).div_ceil(6)..((offset + secret.len()) * 8) / 6];
        assert!(!session.contains(fragment), "base64 unmasked: {session}");
    }
    let out = stdout(&all);
    assert!(out.contains("you sent: Bearer [REDACTED:gh]"), "{out}");
    // The split line came out whole and masked (held back until the second write).
    assert!(
        out.lines().filter(|l| l.trim() == "[REDACTED:gh]").count() == 1,
        "{out}"
    );
    let stderr = output(&all, "stderr");
    assert!(stderr.contains("[REDACTED:gh]"), "{stderr}");
    let custom = of_kind(&all, "custom");
    assert_eq!(custom.len(), 1, "{session}");
    assert_eq!(custom[0]["payload"]["token"], "[REDACTED:gh]");
    let hits = files_containing(&fleet_dir, secret.as_bytes());
    assert!(hits.is_empty(), "the secret was found in {hits:?}");
}

#[test]
fn secret_commands_store_list_and_remove_without_ever_showing_a_value() {
    let mut fleet = new_fleet();
    fleet.start_coordinator_and_wait();
    let value = canary();
    let out = set_secret(&fleet, "deploy-key", &value);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let set: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(set["created"], true);
    assert_eq!(set["info"]["version"], 1);
    let out = set_secret(&fleet, "deploy-key", &canary());
    let again: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(
        (again["created"].clone(), again["info"]["version"].clone()),
        (json!(false), json!(2))
    );

    let list: Vec<SecretInfo> = fleet.cli_json(&["secret", "list", "--json"]);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].name, "deploy-key");
    let table = fleet.cli(&["secret", "list"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("deploy-key") && !table.contains(&value),
        "{table}"
    );

    // Bad input: a short value, a bad name — exit 2, nothing stored.
    let short = set_secret(&fleet, "short", "abc");
    assert_eq!(short.status.code(), Some(2), "{short:?}");
    assert!(
        String::from_utf8_lossy(&short.stderr).contains("8 to"),
        "{short:?}"
    );
    let bad = fleet.cli(&["secret", "set", "no spaces"]);
    assert_eq!(bad.status.code(), Some(2));
    let list: Vec<SecretInfo> = fleet.cli_json(&["secret", "list", "--json"]);
    assert_eq!(list.len(), 1);

    // A spec granting a secret that is not stored is refused at submit, naming it.
    let spec = json!({
        "name": "needs-missing", "command": ["true"], "network": "proxy",
        "egress": ["api.github.com"],
        "secrets": [{ "name": "missing", "hosts": ["api.github.com"] }],
    });
    let path = write_spec(&fleet, "missing", &spec);
    let out = fleet.cli(&["submit", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"missing\"") && err.contains("drover secret set missing"),
        "{err}"
    );
    // A grant for a host outside egress is a spec error naming the field.
    let spec = json!({
        "name": "outside", "command": ["true"], "network": "proxy",
        "egress": ["api.github.com"],
        "secrets": [{ "name": "deploy-key", "hosts": ["evil.example"] }],
    });
    let path = write_spec(&fleet, "outside", &spec);
    let out = fleet.cli(&["submit", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("secrets[0].hosts[0]"),
        "{out:?}"
    );
    let tasks: Vec<TaskInfo> = fleet.cli_json(&["tasks", "--json"]);
    assert!(tasks.is_empty(), "nothing was queued: {tasks:?}");

    let rm = fleet.cli(&["secret", "rm", "deploy-key"]);
    assert!(rm.status.success());
    let rm = fleet.cli(&["secret", "rm", "deploy-key"]);
    assert_eq!(rm.status.code(), Some(1));

    // The database holds only ciphertexts; the coordinator's log never the value.
    fleet.wait_for(DEADLINE, "the log to be written", || {
        Ok::<_, String>(fleet.coordinator_log())
    });
    let state = fleet.dir().join("state");
    assert!(files_containing(&state, value.as_bytes()).is_empty());
    assert!(!fleet.coordinator_log().contains(&value));
}
