//! What a first-time user runs into: retry backoff, listing, idempotency, error texts, a
//! closed pipe and an unreachable cluster, each against real processes.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_ports, schedctl, schedctl_bin, Cluster};

#[test]
fn max_attempts_alone_keeps_the_default_backoff() {
    let mut c = Cluster::start(1);
    c.start_worker("w1", "sh -c \"$SCHED_PAYLOAD\"", &["--slots", "2"]);
    let r = c.ctl(&[
        "-o",
        "json",
        "task",
        "submit",
        "--name",
        "flaky",
        "--payload",
        "exit 1",
        "--max-attempts",
        "3",
        "--wait",
    ]);
    assert_eq!(r.code, 1, "the task fails in the end: {r:?}");
    let v = r.json();
    assert_eq!(v["state"], "failed");
    assert_eq!(v["attempt"], 3);
    // The recorded transitions (log time): every retry waited in `delayed` for the default
    // backoff (1 s, then 2 s, less at most 20% jitter) before it was assigned again.
    let updates = v["updates"].as_array().unwrap();
    let mut waits = Vec::new();
    for pair in updates.windows(2) {
        if pair[0]["state"] == "delayed" {
            let from = pair[0]["updated_at_ms"].as_u64().unwrap();
            let to = pair[1]["updated_at_ms"].as_u64().unwrap();
            waits.push(to - from);
        }
    }
    assert_eq!(waits.len(), 2, "two retries, each after a backoff: {updates:?}");
    assert!(waits[0] >= 800, "first backoff {} ms: {updates:?}", waits[0]);
    assert!(waits[1] >= 1_600, "second backoff {} ms: {updates:?}", waits[1]);
}

#[test]
fn list_is_newest_first_with_pages_and_a_hint() {
    let c = Cluster::start(1);
    let ids: Vec<u64> = (0..5).map(|i| c.submit(&["--name", &format!("t{i}")])).collect();
    let first = c.ok(&["task", "list", "--limit", "2"]);
    let got: Vec<u64> =
        first["tasks"].as_array().unwrap().iter().map(|t| t["id"].as_u64().unwrap()).collect();
    assert_eq!(got, vec![ids[4], ids[3]], "newest first");
    assert_eq!(first["remaining"], 3);
    let token = first["next_page_token"].as_u64().unwrap();
    assert_ne!(token, 0);
    let second = c.ok(&["task", "list", "--limit", "10", "--page-token", &token.to_string()]);
    let got: Vec<u64> =
        second["tasks"].as_array().unwrap().iter().map(|t| t["id"].as_u64().unwrap()).collect();
    assert_eq!(got, vec![ids[2], ids[1], ids[0]]);
    assert_eq!(second["next_page_token"], 0);
    let oldest = c.ok(&["task", "list", "--limit", "1", "--oldest-first"]);
    assert_eq!(oldest["tasks"][0]["id"].as_u64(), Some(ids[0]));
    let recent = c.ok(&["task", "list", "--since", "10m"]);
    assert_eq!(recent["tasks"].as_array().unwrap().len(), 5);
    let table = c.ctl(&["task", "list", "--limit", "2"]);
    assert_eq!(table.code, 0);
    assert!(
        table.stderr.contains(&format!("3 more: use --page-token {token}")),
        "the table says there is more: {table:?}"
    );
}

#[test]
fn a_reused_key_with_another_body_is_refused_by_name() {
    let c = Cluster::start(1);
    let id = c.submit(&["--name", "a", "--payload", "one", "--key", "k-1"]);
    let again = c.submit(&["--name", "a", "--payload", "one", "--key", "k-1"]);
    assert_eq!(again, id, "same key, same body: the same task");
    let r =
        c.ctl(&["-o", "json", "task", "submit", "--name", "a", "--payload", "two", "--key", "k-1"]);
    assert_eq!(r.code, 1, "{r:?}");
    let e = &r.json()["error"];
    assert_eq!(e["code"], "FAILED_PRECONDITION");
    assert_eq!(e["reason"], "idempotency_conflict");
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("\"k-1\"") && msg.contains(&format!("task {id}")), "{msg}");
    assert!(msg.contains("payload"), "names the field: {msg}");
    assert!(!r.stderr.contains("--key k-1"), "a rejection is not worth repeating: {r:?}");
    assert_eq!(c.task(id)["payload"], "one", "the accepted task is untouched");
}

#[test]
fn bad_values_get_invalid_argument_in_words() {
    let c = Cluster::start(1);
    let r = c.ctl(&["task", "submit", "--name", "x", "--delay", "1y"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("INVALID_ARGUMENT"), "{r:?}");
    assert!(r.stderr.contains("delay_ms"), "{r:?}");
    assert!(!r.stderr.contains("repeat"), "{r:?}");
    // Explain a delayed task: a time and a distance, not raw milliseconds.
    let id = c.submit(&["--name", "later", "--delay", "1h"]);
    let e = c.ctl(&["task", "explain", &id.to_string()]);
    assert_eq!(e.code, 0, "{e:?}");
    assert!(e.stdout.contains("(in 59m") || e.stdout.contains("(in 1h"), "{e:?}");
    let raw = c.task(id)["not_before_ms"].as_u64().unwrap_or(0).to_string();
    assert!(raw == "0" || !e.stdout.contains(&raw), "no unix milliseconds: {e:?}");
    let cancelled = c.ctl(&["task", "cancel", &id.to_string(), "--reason", "not needed"]);
    assert_eq!(cancelled.code, 0);
    let e = c.ctl(&["task", "explain", &id.to_string()]);
    assert!(e.stdout.contains("cancelled: not needed"), "{e:?}");
    assert!(!e.stdout.contains("cancelled: cancelled"), "{e:?}");
}

#[test]
fn a_closed_stdout_ends_the_command_quietly() {
    let c = Cluster::start(1);
    for i in 0..3 {
        c.submit(&["--name", &format!("t{i}")]);
    }
    let mut child = Command::new(schedctl_bin())
        .args(["--endpoints", &c.endpoints(), "-o", "json", "task", "list"])
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The reader goes away before the output is written, as `| head -0` would.
    drop(child.stdout.take());
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(status.code(), Some(141), "the SIGPIPE convention: {stderr}");
}

#[test]
fn refused_connections_everywhere_fail_at_once_naming_the_addresses() {
    let ports = free_ports(2);
    let endpoints = format!("127.0.0.1:{},127.0.0.1:{}", ports[0], ports[1]);
    // A 10-minute retry budget that must not be spent: nothing listens, nothing was sent.
    let mut child = Command::new(schedctl_bin())
        .args(["--endpoints", &endpoints, "--retry-budget", "10m", "task", "get", "1"])
        .env_remove("SCHED_ENDPOINTS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("schedctl kept retrying refused connections");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    assert_eq!(status.code(), Some(3), "{stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{}", ports[0])), "{stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{}", ports[1])), "{stderr}");
    // A write says nothing was applied, so there is nothing to repeat.
    let r = schedctl(&["--endpoints", &endpoints, "-o", "json", "task", "submit", "--name", "x"]);
    assert_eq!(r.code, 3);
    assert_eq!(r.json()["error"]["unknown_outcome"], false);
}
