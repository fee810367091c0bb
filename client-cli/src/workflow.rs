//! Workflow files: a DAG of named tasks submitted as one atomic SubmitTasks request.
//!
//! A workflow is JSON or YAML: either a list of tasks, or an object with a `tasks` list (and an
//! optional `key_prefix`). Every task has a `name`, unique in the file, and may list the names
//! it runs after:
//!
//! ```yaml
//! key_prefix: nightly-2024-06-01     # optional: makes resubmitting the file idempotent
//! tasks:
//!   - name: extract
//!     payload: ./extract.sh
//!   - name: transform
//!     after: [extract]
//!     cpu: 500m                      # or 0.5 (cores); mem: 2GiB, 512Mi or 512 (MiB)
//!     timeout: 5m
//!     max_attempts: 5
//!     backoff: 2s                    # retry delays 2s, 4s, 8s... up to backoff_max
//!   - name: load
//!     after: [transform]
//!     labels: { zone: eu }
//! ```
//!
//! Every field of `schedctl task submit` is accepted: `payload` / `payload_file` (relative to
//! the workflow file), `priority`, `queue`, `cpu`, `mem`, `resources` (map), `labels` (map),
//! `metadata` (map), `max_attempts`, `backoff`, `backoff_max`, `timeout` and `delay`
//! (durations such as `30s`, `5m`), `backoff_multiplier` (e.g. 2), `key` (idempotency key),
//! plus `after_ids` for existing task ids. `cpu` and `mem` take the quantities of
//! [`crate::quantity`].
//!
//! [`Workflow::to_request`] checks the graph before anything is sent: duplicate names, unknown
//! names and cycles are reported with the names involved. Dependencies become batch positions
//! (`depends_on_batch`), so the server accepts the whole DAG or nothing. Without a key prefix,
//! every task gets a random idempotency key (the retry of a submit whose answer was lost never
//! duplicates the workflow); with one, task `n` gets `<prefix>/<n>`, so submitting the same file
//! twice returns the tasks of the first submission.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use proto::pb;
use serde::Deserialize;

/// Parses a backoff multiplier (`2`, `1.5`) into thousandths.
pub fn multiplier_permille(s: &str) -> Result<u32, String> {
    let x: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number like 2 or 1.5"))?;
    multiplier_to_permille(x)
}

/// A backoff multiplier (between 1 and 10) in thousandths.
pub fn multiplier_to_permille(x: f64) -> Result<u32, String> {
    if !(1.0..=10.0).contains(&x) {
        return Err(format!("{x} is outside 1..10 (2 doubles the delay on every retry)"));
    }
    Ok((x * 1000.0).round() as u32)
}

/// The wire retry policy for these settings; `None` when none is given, so the server's
/// default policy applies. Unset fields stay unset on the wire and mean "default" there
/// (1 s, doubling, capped at 1 min).
pub fn retry_policy(
    max_attempts: Option<u32>,
    initial_backoff_ms: Option<u64>,
    max_backoff_ms: Option<u64>,
    multiplier_permille: Option<u32>,
) -> Option<pb::RetryPolicy> {
    if max_attempts.is_none()
        && initial_backoff_ms.is_none()
        && max_backoff_ms.is_none()
        && multiplier_permille.is_none()
    {
        return None;
    }
    Some(pb::RetryPolicy {
        max_attempts: max_attempts.unwrap_or(0),
        initial_backoff_ms,
        multiplier_permille,
        max_backoff_ms,
    })
}

/// Why a workflow file cannot be submitted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WorkflowError {
    /// The file could not be read.
    #[error("cannot read {path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        reason: String,
    },
    /// The file is not valid JSON/YAML or has unknown/mistyped fields.
    #[error("{path}: {reason}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message (with line and column).
        reason: String,
    },
    /// The workflow has no tasks.
    #[error("the workflow has no tasks")]
    Empty,
    /// A task has no name.
    #[error("task #{position} has no name")]
    MissingName {
        /// 1-based position in the file.
        position: usize,
    },
    /// Two tasks share a name.
    #[error("task name {name:?} is used more than once (tasks #{first} and #{second})")]
    DuplicateName {
        /// The name.
        name: String,
        /// 1-based positions.
        first: usize,
        /// 1-based positions.
        second: usize,
    },
    /// A dependency names no task of the workflow.
    #[error("task {task:?} runs after {missing:?}, which is not a task of this workflow")]
    UnknownDependency {
        /// The dependent task.
        task: String,
        /// The unknown name.
        missing: String,
    },
    /// The dependencies form a cycle.
    #[error("dependency cycle: {}", cycle.join(" -> "))]
    Cycle {
        /// The names on the cycle, the first repeated at the end.
        cycle: Vec<String>,
    },
    /// A field value is invalid.
    #[error("task {task:?}: {reason}")]
    InvalidField {
        /// The task.
        task: String,
        /// What is wrong.
        reason: String,
    },
}

/// A duration written as `30s`, `5m`, `1h 30m`, or a number of milliseconds.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
enum DurationField {
    Millis(u64),
    Text(String),
}

impl DurationField {
    fn to_millis(&self, task: &str, field: &str) -> Result<u64, WorkflowError> {
        match self {
            DurationField::Millis(ms) => Ok(*ms),
            DurationField::Text(s) => humantime::parse_duration(s)
                .map(|d: Duration| d.as_millis() as u64)
                .map_err(|e| WorkflowError::InvalidField {
                    task: task.to_string(),
                    reason: format!("{field}: {s:?} is not a duration ({e})"),
                }),
        }
    }
}

/// One task of a workflow file.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WorkflowTask {
    /// Unique name in the workflow; also the task's name.
    #[serde(default)]
    pub name: String,
    /// Names of the tasks this one runs after.
    #[serde(default, alias = "depends_on", alias = "needs")]
    pub after: Vec<String>,
    /// Ids of existing tasks this one runs after.
    #[serde(default)]
    pub after_ids: Vec<u64>,
    /// Payload text.
    pub payload: Option<String>,
    /// File whose bytes are the payload (relative to the workflow file).
    pub payload_file: Option<PathBuf>,
    /// Priority (higher first).
    #[serde(default)]
    pub priority: i32,
    /// Queue (default `default`).
    pub queue: Option<String>,
    /// CPU needed, in millicores (the file says `0.5` or `500m`).
    #[serde(default, deserialize_with = "crate::quantity::deserialize_cpu_milli")]
    pub cpu: u64,
    /// Memory needed, in MiB (the file says `512`, `2GiB` or `512Mi`).
    #[serde(default, deserialize_with = "crate::quantity::deserialize_mem_mib")]
    pub mem: u64,
    /// Named resources needed (`gpu: 1`).
    #[serde(default)]
    pub resources: BTreeMap<String, u64>,
    /// Required worker labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Free-form metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Total attempts allowed.
    pub max_attempts: Option<u32>,
    /// Delay before the first retry.
    backoff: Option<DurationField>,
    /// Longest delay between retries.
    backoff_max: Option<DurationField>,
    /// Growth of the delay per retry (2 = doubling).
    backoff_multiplier: Option<f64>,
    /// Per-attempt timeout.
    timeout: Option<DurationField>,
    /// Delay before the task may run.
    delay: Option<DurationField>,
    /// Idempotency key (overrides the key prefix).
    pub key: Option<String>,
}

#[derive(Debug)]
enum FileShape {
    List(Vec<WorkflowTask>),
    Object(WorkflowObject),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkflowObject {
    #[serde(default)]
    key_prefix: Option<String>,
    tasks: Vec<WorkflowTask>,
}

/// A parsed workflow.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Workflow {
    /// Makes keys `<prefix>/<name>` when set.
    pub key_prefix: Option<String>,
    /// The tasks, in file order.
    pub tasks: Vec<WorkflowTask>,
    /// Directory that relative `payload_file`s are read from.
    pub base_dir: PathBuf,
}

/// A request ready to send, with each task's name in request order.
#[derive(Clone, Debug, PartialEq)]
pub struct PreparedWorkflow {
    /// The atomic submit.
    pub request: pb::SubmitTasksRequest,
    /// `names[i]` is the name of `request.tasks[i]`.
    pub names: Vec<String>,
}

impl Workflow {
    /// Reads and parses a file (JSON for `.json`, YAML otherwise; YAML also reads JSON).
    pub fn load(path: &Path) -> Result<Workflow, WorkflowError> {
        let text = std::fs::read_to_string(path).map_err(|e| WorkflowError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let json = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
        let mut wf = Workflow::parse(&text, json)
            .map_err(|reason| WorkflowError::Parse { path: path.display().to_string(), reason })?;
        wf.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Ok(wf)
    }

    /// Parses workflow text.
    pub fn parse(text: &str, json: bool) -> Result<Workflow, String> {
        // Find the shape first, then parse the text again as exactly that shape: an untagged
        // enum would hide the real error ("unknown field `priorty`" at a line) behind "did not
        // match any variant".
        let is_list = if json {
            let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
            v.is_array()
        } else {
            let v: serde_norway::Value = serde_norway::from_str(text).map_err(|e| e.to_string())?;
            v.is_sequence()
        };
        let shape = match (is_list, json) {
            (true, true) => FileShape::List(serde_json::from_str(text).map_err(|e| e.to_string())?),
            (true, false) => {
                FileShape::List(serde_norway::from_str(text).map_err(|e| e.to_string())?)
            }
            (false, true) => {
                FileShape::Object(serde_json::from_str(text).map_err(|e| e.to_string())?)
            }
            (false, false) => {
                FileShape::Object(serde_norway::from_str(text).map_err(|e| e.to_string())?)
            }
        };
        Ok(match shape {
            FileShape::List(tasks) => {
                Workflow { key_prefix: None, tasks, base_dir: PathBuf::new() }
            }
            FileShape::Object(o) => {
                Workflow { key_prefix: o.key_prefix, tasks: o.tasks, base_dir: PathBuf::new() }
            }
        })
    }

    /// Checks the graph and builds the request (see the module documentation).
    pub fn to_request(&self) -> Result<PreparedWorkflow, WorkflowError> {
        if self.tasks.is_empty() {
            return Err(WorkflowError::Empty);
        }
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (i, t) in self.tasks.iter().enumerate() {
            if t.name.trim().is_empty() {
                return Err(WorkflowError::MissingName { position: i + 1 });
            }
            if let Some(first) = index.insert(t.name.as_str(), i) {
                return Err(WorkflowError::DuplicateName {
                    name: t.name.clone(),
                    first: first + 1,
                    second: i + 1,
                });
            }
        }
        let mut deps: Vec<Vec<usize>> = Vec::with_capacity(self.tasks.len());
        for t in &self.tasks {
            let mut d = Vec::new();
            for name in &t.after {
                let Some(&j) = index.get(name.as_str()) else {
                    return Err(WorkflowError::UnknownDependency {
                        task: t.name.clone(),
                        missing: name.clone(),
                    });
                };
                if !d.contains(&j) {
                    d.push(j);
                }
            }
            deps.push(d);
        }
        if let Some(cycle) = find_cycle(&deps) {
            return Err(WorkflowError::Cycle {
                cycle: cycle.into_iter().map(|i| self.tasks[i].name.clone()).collect(),
            });
        }
        let mut request = pb::SubmitTasksRequest::default();
        for (t, d) in self.tasks.iter().zip(&deps) {
            let mut spec = self.spec(t)?;
            spec.depends_on_batch = d.iter().map(|&j| j as u32).collect();
            request.tasks.push(spec);
        }
        Ok(PreparedWorkflow { request, names: self.tasks.iter().map(|t| t.name.clone()).collect() })
    }

    fn spec(&self, t: &WorkflowTask) -> Result<pb::TaskSpec, WorkflowError> {
        let invalid = |reason: String| WorkflowError::InvalidField { task: t.name.clone(), reason };
        let payload = match (&t.payload, &t.payload_file) {
            (Some(_), Some(_)) => {
                return Err(invalid("give either payload or payload_file, not both".into()))
            }
            (Some(p), None) => p.as_bytes().to_vec(),
            (None, Some(f)) => {
                let path = if f.is_absolute() { f.clone() } else { self.base_dir.join(f) };
                std::fs::read(&path)
                    .map_err(|e| invalid(format!("payload_file {}: {e}", path.display())))?
            }
            (None, None) => Vec::new(),
        };
        let millis = |d: &Option<DurationField>, field: &str| {
            d.as_ref().map(|d| d.to_millis(&t.name, field)).transpose()
        };
        let multiplier = t
            .backoff_multiplier
            .map(multiplier_to_permille)
            .transpose()
            .map_err(|e| invalid(format!("backoff_multiplier: {e}")))?;
        let retry = retry_policy(
            t.max_attempts,
            millis(&t.backoff, "backoff")?,
            millis(&t.backoff_max, "backoff_max")?,
            multiplier,
        );
        let key = match (&t.key, &self.key_prefix) {
            (Some(k), _) => k.clone(),
            (None, Some(prefix)) => format!("{prefix}/{}", t.name),
            (None, None) => crate::client::new_idempotency_key(),
        };
        Ok(pb::TaskSpec {
            name: t.name.clone(),
            payload,
            queue: t.queue.clone().unwrap_or_default(),
            priority: t.priority,
            depends_on: t.after_ids.clone(),
            depends_on_batch: Vec::new(),
            resources: Some(pb::Resources {
                cpu_milli: t.cpu,
                memory_mib: t.mem,
                named: t.resources.clone().into_iter().collect(),
            }),
            labels: t.labels.clone().into_iter().collect(),
            retry,
            timeout_ms: match &t.timeout {
                Some(d) => d.to_millis(&t.name, "timeout")?,
                None => 0,
            },
            not_before_ms: 0,
            delay_ms: match &t.delay {
                Some(d) => d.to_millis(&t.name, "delay")?,
                None => 0,
            },
            metadata: t.metadata.clone().into_iter().collect(),
            idempotency_key: key,
        })
    }
}

/// A cycle in the graph (`deps[i]` = the nodes `i` depends on), as node indexes with the first
/// repeated at the end; `None` when the graph is acyclic. Iterative DFS: a deep chain cannot
/// overflow the stack.
fn find_cycle(deps: &[Vec<usize>]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    let mut mark = vec![Mark::New; deps.len()];
    for root in 0..deps.len() {
        if mark[root] != Mark::New {
            continue;
        }
        // (node, next edge to look at)
        let mut stack: Vec<(usize, usize)> = vec![(root, 0)];
        mark[root] = Mark::OnPath;
        while let Some(&mut (node, ref mut edge)) = stack.last_mut() {
            if let Some(&next) = deps[node].get(*edge) {
                *edge += 1;
                match mark[next] {
                    Mark::New => {
                        mark[next] = Mark::OnPath;
                        stack.push((next, 0));
                    }
                    Mark::OnPath => {
                        let start = stack.iter().position(|&(n, _)| n == next).unwrap_or(0);
                        let mut cycle: Vec<usize> =
                            stack[start..].iter().map(|&(n, _)| n).collect();
                        cycle.push(next);
                        // Edges point at dependencies; show the cycle in run order.
                        cycle.reverse();
                        return Some(cycle);
                    }
                    Mark::Done => {}
                }
            } else {
                mark[node] = Mark::Done;
                stack.pop();
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepare(yaml: &str) -> Result<PreparedWorkflow, WorkflowError> {
        Workflow::parse(yaml, false).unwrap().to_request()
    }

    #[test]
    fn yaml_dag_becomes_one_batch_with_positions() {
        let p = prepare(
            r#"
key_prefix: run1
tasks:
  - name: a
    payload: echo a
  - name: b
    after: [a]
    cpu: 500m
    mem: 64
    resources: { gpu: 1 }
    labels: { zone: eu }
    priority: 5
    queue: q
    max_attempts: 2
    timeout: 30s
    delay: 1500
  - name: c
    after: [a, b, a]
    key: mine
"#,
        )
        .unwrap();
        assert_eq!(p.names, vec!["a", "b", "c"]);
        let t = &p.request.tasks;
        assert_eq!(t[0].payload, b"echo a");
        assert!(t[0].depends_on_batch.is_empty());
        assert_eq!(t[1].depends_on_batch, vec![0]);
        assert_eq!(t[2].depends_on_batch, vec![0, 1], "duplicates collapse");
        let r = t[1].resources.as_ref().unwrap();
        assert_eq!((r.cpu_milli, r.memory_mib, r.named["gpu"]), (500, 64, 1));
        assert_eq!(t[1].labels["zone"], "eu");
        assert_eq!((t[1].priority, t[1].queue.as_str()), (5, "q"));
        assert_eq!(t[1].retry.as_ref().unwrap().max_attempts, 2);
        assert_eq!((t[1].timeout_ms, t[1].delay_ms), (30_000, 1500));
        assert_eq!(t[0].idempotency_key, "run1/a");
        assert_eq!(t[2].idempotency_key, "mine");
        assert_eq!(t[1].retry.as_ref().unwrap().initial_backoff_ms, None, "unset means default");
    }

    #[test]
    fn quantities_and_backoff_keys_are_read() {
        let p = prepare(
            r#"
- name: a
  cpu: 0.5
  mem: 2GiB
  backoff: 2s
  backoff_max: 5m
  backoff_multiplier: 1.5
- name: b
  mem: "512Mi"
  backoff: 0s
"#,
        )
        .unwrap();
        let t = &p.request.tasks;
        let r = t[0].resources.as_ref().unwrap();
        assert_eq!((r.cpu_milli, r.memory_mib), (500, 2048));
        let retry = t[0].retry.as_ref().unwrap();
        assert_eq!(retry.max_attempts, 0, "unset: the server's default count");
        assert_eq!(retry.initial_backoff_ms, Some(2_000));
        assert_eq!(retry.max_backoff_ms, Some(300_000));
        assert_eq!(retry.multiplier_permille, Some(1_500));
        assert_eq!(t[1].resources.as_ref().unwrap().memory_mib, 512);
        assert_eq!(t[1].retry.as_ref().unwrap().initial_backoff_ms, Some(0));
        let bad = Workflow::parse("- name: a\n  cpu: 1500\n", false).unwrap_err();
        assert!(bad.contains("1500m"), "{bad}");
        let bad = prepare("- name: a\n  backoff_multiplier: 20\n").unwrap_err().to_string();
        assert!(bad.contains("backoff_multiplier"), "{bad}");
    }

    #[test]
    fn json_list_is_accepted_and_keys_are_random_without_prefix() {
        let wf = Workflow::parse(
            r#"[{"name":"x","payload":"1"},{"name":"y","depends_on":["x"]}]"#,
            true,
        )
        .unwrap();
        let p1 = wf.to_request().unwrap();
        let p2 = wf.to_request().unwrap();
        assert_eq!(p1.request.tasks[1].depends_on_batch, vec![0]);
        assert_eq!(p1.request.tasks[0].idempotency_key.len(), 32);
        assert_ne!(p1.request.tasks[0].idempotency_key, p2.request.tasks[0].idempotency_key);
    }

    #[test]
    fn unknown_names_duplicates_and_missing_names_are_refused() {
        assert_eq!(
            prepare("- name: a\n  after: [nope]\n"),
            Err(WorkflowError::UnknownDependency { task: "a".into(), missing: "nope".into() })
        );
        assert_eq!(
            prepare("- name: a\n- name: b\n- name: a\n"),
            Err(WorkflowError::DuplicateName { name: "a".into(), first: 1, second: 3 })
        );
        assert_eq!(prepare("- payload: x\n"), Err(WorkflowError::MissingName { position: 1 }));
        assert_eq!(prepare("[]"), Err(WorkflowError::Empty));
    }

    #[test]
    fn cycles_are_reported_with_their_names() {
        let e = prepare(
            "- name: a\n  after: [c]\n- name: b\n  after: [a]\n- name: c\n  after: [b]\n- name: d\n",
        )
        .unwrap_err();
        let WorkflowError::Cycle { cycle } = &e else { panic!("{e:?}") };
        assert_eq!(cycle.len(), 4);
        assert_eq!(cycle.first(), cycle.last());
        for n in ["a", "b", "c"] {
            assert!(cycle.contains(&n.to_string()), "{cycle:?}");
        }
        assert!(e.to_string().starts_with("dependency cycle: "));
        let self_loop = prepare("- name: a\n  after: [a]\n").unwrap_err();
        assert_eq!(self_loop, WorkflowError::Cycle { cycle: vec!["a".into(), "a".into()] });
    }

    #[test]
    fn deep_chains_do_not_overflow() {
        let mut deps: Vec<Vec<usize>> =
            (0..200_000).map(|i| if i == 0 { vec![] } else { vec![i - 1] }).collect();
        assert_eq!(find_cycle(&deps), None);
        deps[0] = vec![199_999];
        assert_eq!(find_cycle(&deps).map(|c| c.len()), Some(200_001));
    }

    #[test]
    fn bad_fields_are_refused_before_sending() {
        let e = Workflow::parse("- name: a\n  colour: red\n", false).unwrap_err();
        assert!(e.contains("colour"), "the unknown field is named: {e}");
        let e = Workflow::parse(r#"{"tasks": [{"name": "a", "prio": 1}]}"#, true).unwrap_err();
        assert!(e.contains("prio"), "{e}");
        assert!(Workflow::parse("just text", false).is_err());
        let e = prepare("- name: a\n  timeout: soon\n").unwrap_err();
        assert!(matches!(e, WorkflowError::InvalidField { .. }), "{e:?}");
        let e = prepare("- name: a\n  payload: x\n  payload_file: f\n").unwrap_err();
        assert!(matches!(e, WorkflowError::InvalidField { .. }), "{e:?}");
    }

    #[test]
    fn payload_files_are_relative_to_the_workflow() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.sh"), "echo from file").unwrap();
        let wf_path = dir.path().join("wf.yaml");
        std::fs::write(&wf_path, "- name: a\n  payload_file: p.sh\n").unwrap();
        let p = Workflow::load(&wf_path).unwrap().to_request().unwrap();
        assert_eq!(p.request.tasks[0].payload, b"echo from file");
        let missing = Workflow::load(&dir.path().join("nope.yaml")).unwrap_err();
        assert!(matches!(missing, WorkflowError::Read { .. }));
    }
}
