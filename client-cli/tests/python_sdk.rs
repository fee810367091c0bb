//! The Python SDK (`client-cli/python`): its committed protobuf modules match `proto/`, and its
//! pytest suite passes against real clusters of the binaries built here.
//!
//! The suite runs in a virtualenv under `target/python-venv`, created when missing; the pinned
//! requirements and the package are (re)installed only when their content hash differs from the
//! one stamped in the venv. Needs `python3` (>= 3.9) with `venv`, and PyPI the first time. The
//! package also promises Python 3.9: when one is found (`SCHED_TEST_PYTHON39`, `python3.9` on
//! the PATH, or a pyenv 3.9), the suite runs with it too, in `target/python39-venv`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn python_dir() -> PathBuf {
    repo().join("client-cli").join("python")
}

/// The generated modules committed under `raftsched/_pb` must equal what protoc makes of the
/// `.proto` now; regenerate with the command this failure prints.
#[test]
fn committed_python_stubs_match_the_proto() {
    let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc");
    let out = tempfile::tempdir().expect("temp dir");
    let status = Command::new(&protoc)
        .current_dir(repo().join("proto"))
        .args(["-Iproto", "--python_out"])
        .arg(out.path())
        .arg("--pyi_out")
        .arg(out.path())
        .arg("proto/scheduler/v1/scheduler.proto")
        .status()
        .expect("running protoc");
    assert!(status.success(), "protoc failed");
    for f in ["scheduler_pb2.py", "scheduler_pb2.pyi"] {
        let fresh = std::fs::read(out.path().join("scheduler/v1").join(f)).expect("generated");
        let committed_path = python_dir().join("raftsched/_pb").join(f);
        let committed = std::fs::read(&committed_path).unwrap_or_default();
        assert!(
            fresh == committed,
            "{} is stale; regenerate: cd proto && {} -Iproto --python_out=OUT --pyi_out=OUT \
             proto/scheduler/v1/scheduler.proto, then copy OUT/scheduler/v1/{f} there",
            committed_path.display(),
            protoc.display()
        );
    }
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A hash of everything pip installs: the requirements and the package sources.
fn install_stamp(dir: &Path) -> String {
    fn walk(p: &Path, files: &mut Vec<PathBuf>) {
        let mut entries: Vec<_> =
            std::fs::read_dir(p).into_iter().flatten().flatten().map(|e| e.path()).collect();
        entries.sort();
        for e in entries {
            if e.is_dir() && !e.ends_with("__pycache__") {
                walk(&e, files);
            } else if e.is_file() {
                files.push(e);
            }
        }
    }
    let mut files = vec![dir.join("pyproject.toml"), dir.join("requirements-test.txt")];
    walk(&dir.join("raftsched"), &mut files);
    // FNV-1a over names and contents: enough to notice a change.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for f in files {
        for b in f.to_string_lossy().bytes().chain(std::fs::read(&f).unwrap_or_default()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// One suite at a time: each starts several clusters, and the machine may be small.
static SUITE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs the pytest suite with `python3` (an interpreter) in the virtualenv `venv_name`.
fn run_suite(python3: &Path, venv_name: &str) {
    let _one_at_a_time = SUITE.lock().unwrap_or_else(|e| e.into_inner());
    let py_dir = python_dir();
    let bin_dir =
        Path::new(env!("CARGO_BIN_EXE_schedctl")).parent().expect("bin dir").to_path_buf();
    let schedulerd =
        client::local::find_schedulerd(Some(Path::new(env!("CARGO_BIN_EXE_schedctl"))))
            .expect("schedulerd next to schedctl; build with cargo build --release");
    let venv = bin_dir.parent().unwrap_or(&bin_dir).join(venv_name);
    let python = venv.join("bin").join("python");
    if !python.is_file() {
        run(Command::new(python3).args(["-m", "venv"]).arg(&venv), "python -m venv");
    }
    let stamp_file = venv.join("raftsched-install.stamp");
    let stamp = install_stamp(&py_dir);
    if std::fs::read_to_string(&stamp_file).ok().as_deref() != Some(stamp.as_str()) {
        run(
            Command::new(&python)
                .args(["-m", "pip", "install", "-q", "--disable-pip-version-check", "-r"])
                .arg(py_dir.join("requirements-test.txt"))
                .arg(&py_dir),
            "pip install",
        );
        std::fs::write(&stamp_file, &stamp).expect("writing the install stamp");
    }
    let out = Command::new(&python)
        .current_dir(&py_dir)
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"])
        .env("SCHEDULERD_BIN", &schedulerd)
        .env("SCHEDCTL_BIN", env!("CARGO_BIN_EXE_schedctl"))
        .env_remove("SCHED_ENDPOINTS")
        .env_remove("SCHED_CA_CERT")
        .env_remove("SCHED_TOKEN")
        .output()
        .expect("running pytest");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout.lines().rev().find(|l| l.contains(" in ")).unwrap_or("");
    println!("pytest ({venv_name}): {summary}");
    assert!(
        out.status.success(),
        "pytest with {} failed ({}):\n{stdout}\n{}",
        python3.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn python_sdk_pytest_suite_passes_against_real_clusters() {
    run_suite(Path::new("python3"), "python-venv");
}

/// Whether `python` runs and is a 3.9.
fn is_python39(python: &Path) -> bool {
    Command::new(python)
        .args(["-c", "import sys; sys.exit(sys.version_info[:2] != (3, 9))"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A Python 3.9 interpreter, if this machine has one.
fn python39() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SCHED_TEST_PYTHON39") {
        let p = PathBuf::from(p);
        assert!(is_python39(&p), "SCHED_TEST_PYTHON39={} is not a Python 3.9", p.display());
        return Some(p);
    }
    let mut candidates = vec![PathBuf::from("python3.9")];
    let pyenv = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pyenv")));
    if let Some(versions) = pyenv.map(|r| r.join("versions")) {
        let mut found: Vec<PathBuf> = std::fs::read_dir(versions)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("3.9"))
            .map(|e| e.path().join("bin").join("python3.9"))
            .collect();
        found.sort();
        candidates.extend(found.into_iter().rev());
    }
    candidates.into_iter().find(|p| is_python39(p))
}

#[test]
fn python_sdk_pytest_suite_passes_on_python_3_9() {
    match python39() {
        Some(p) => run_suite(&p, "python39-venv"),
        None => println!("no Python 3.9 here (set SCHED_TEST_PYTHON39): suite not run on it"),
    }
}
