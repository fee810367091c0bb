//! `schedctl` without a cluster: usage errors, an unreachable cluster, local file checks.

mod common;

use common::{free_ports, schedctl};

#[test]
fn usage_errors_exit_2() {
    for args in [
        vec!["task", "get"],
        vec!["task", "get", "not-a-number"],
        vec!["task", "submit", "--payload", "x"],
        vec!["frobnicate"],
        vec!["-o", "xml", "task", "list"],
    ] {
        let r = schedctl(&args);
        assert_eq!(r.code, 2, "{args:?}: {r:?}");
        assert!(!r.stderr.is_empty(), "{args:?} explains the mistake");
    }
    let help = schedctl(&["--help"]);
    assert_eq!(help.code, 0);
    for cmd in ["cluster", "task", "workflow", "worker", "dev"] {
        assert!(help.stdout.contains(cmd), "{cmd} missing from --help");
    }
}

#[test]
fn an_unreachable_cluster_exits_3_with_advice() {
    let port = free_ports(1)[0];
    let endpoint = format!("127.0.0.1:{port}");
    let r = schedctl(&["--endpoints", &endpoint, "--retry-budget", "300ms", "task", "get", "1"]);
    assert_eq!(r.code, 3, "{r:?}");
    assert!(r.stderr.contains(&format!("no node reachable at {endpoint}")), "{r:?}");
    assert!(r.stderr.contains("schedctl dev up"), "{r:?}");
    let j = schedctl(&[
        "--endpoints",
        &endpoint,
        "--retry-budget",
        "300ms",
        "-o",
        "json",
        "cluster",
        "status",
    ]);
    assert_eq!(j.code, 3);
    let v = j.json();
    assert_eq!(v["error"]["code"], "UNAVAILABLE");
    assert_eq!(v["error"]["exit_code"], 3);
    // SCHED_ENDPOINTS works like --endpoints.
    let out = std::process::Command::new(common::schedctl_bin())
        .args(["--retry-budget", "300ms", "worker", "list"])
        .env("SCHED_ENDPOINTS", &endpoint)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&endpoint));
}

#[test]
fn broken_workflow_files_fail_before_contacting_the_cluster() {
    let port = free_ports(1)[0];
    let endpoint = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    for (name, body, expect) in [
        ("dup.yaml", "- name: a\n- name: a\n", "more than once"),
        ("cycle.yaml", "- name: a\n  after: [b]\n- name: b\n  after: [a]\n", "dependency cycle"),
        ("unknown.json", r#"[{"name":"a","after":["zz"]}]"#, "zz"),
        ("typo.yaml", "- name: a\n  priorty: 3\n", "priorty"),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, body).unwrap();
        let r = schedctl(&["--endpoints", &endpoint, "workflow", "submit", path.to_str().unwrap()]);
        // Exit 1 (rejected), not 3: nothing was sent to the (absent) cluster.
        assert_eq!(r.code, 1, "{name}: {r:?}");
        assert!(r.stderr.contains(expect), "{name}: {r:?}");
    }
    let missing =
        schedctl(&["--endpoints", &endpoint, "workflow", "submit", "/nonexistent/wf.yaml"]);
    assert_eq!(missing.code, 1);
    assert!(missing.stderr.contains("cannot read"), "{missing:?}");
}
