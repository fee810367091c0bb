//! Stateless validation of what clients and workers send, shared by the node (which checks
//! before proposing, with its configured limits) and apply (which re-checks with the hard
//! limits, so a command that slipped past an edge with looser settings is still refused the
//! same way on every replica).

use std::collections::{BTreeMap, HashMap};

use crate::command::{DepRef, NewTask};
use crate::error::Rejection;
use crate::model::{Resources, RetryPolicy, TaskSpec, WorkerId, WorkerSpec};

/// Size and count limits. The node's configured limits must not exceed [`HARD`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Tasks in one submit.
    pub max_batch_tasks: usize,
    /// Bytes of one payload.
    pub max_payload_bytes: usize,
    /// Dependencies of one task.
    pub max_deps: usize,
    /// Bytes of a result reported by a worker.
    pub max_result_bytes: usize,
    /// Bytes of an error message kept (longer ones are truncated, not refused).
    pub max_error_bytes: usize,
    /// Bytes of a name, queue, label or metadata key, idempotency key.
    pub max_name_bytes: usize,
    /// Bytes of a label or metadata value.
    pub max_value_bytes: usize,
    /// Entries in the labels or metadata map.
    pub max_map_entries: usize,
    /// Attempts a retry policy may allow.
    pub max_attempts: u32,
    /// Longest backoff, timeout or not_before distance (ms): seven days.
    pub max_duration_ms: u64,
    /// Queues a worker may subscribe to.
    pub max_worker_queues: usize,
    /// Slots a worker may offer.
    pub max_worker_slots: u32,
    /// CPU (millicores) a worker may offer or a task may request.
    pub max_cpu_milli: u64,
    /// Memory (MiB) a worker may offer or a task may request.
    pub max_memory_mib: u64,
    /// Amount of one named resource (`gpu`, `license`, ...) a worker may offer or a task may
    /// request.
    pub max_named_amount: u64,
    /// Distinct named resources in one worker's capacity or one task's request.
    pub max_named_resources: usize,
}

/// The limits apply enforces. Configured limits can only be tighter.
pub const HARD: Limits = Limits {
    max_batch_tasks: 10_000,
    max_payload_bytes: 1 << 20,
    max_deps: 1_000,
    max_result_bytes: 1 << 20,
    max_error_bytes: 16 << 10,
    max_name_bytes: 256,
    max_value_bytes: 1024,
    max_map_entries: 64,
    max_attempts: 1_000,
    max_duration_ms: 7 * 24 * 3600 * 1000,
    max_worker_queues: 64,
    max_worker_slots: 100_000,
    max_cpu_milli: 1 << 32,
    max_memory_mib: 1 << 32,
    max_named_amount: 1 << 32,
    max_named_resources: 64,
};

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: 256 << 10,
            max_result_bytes: 64 << 10,
            // 4096 cores, 64 TiB, a million of any named resource, 32 kinds: far beyond any
            // machine, far below anything that could swamp the planner's sums.
            max_cpu_milli: 4_096_000,
            max_memory_mib: 64 << 20,
            max_named_amount: 1_000_000,
            max_named_resources: 32,
            ..HARD
        }
    }
}

impl Limits {
    /// These limits, each clamped to at most the hard limit.
    pub fn clamped(&self) -> Limits {
        Limits {
            max_batch_tasks: self.max_batch_tasks.min(HARD.max_batch_tasks),
            max_payload_bytes: self.max_payload_bytes.min(HARD.max_payload_bytes),
            max_deps: self.max_deps.min(HARD.max_deps),
            max_result_bytes: self.max_result_bytes.min(HARD.max_result_bytes),
            max_error_bytes: self.max_error_bytes.min(HARD.max_error_bytes),
            max_name_bytes: self.max_name_bytes.min(HARD.max_name_bytes),
            max_value_bytes: self.max_value_bytes.min(HARD.max_value_bytes),
            max_map_entries: self.max_map_entries.min(HARD.max_map_entries),
            max_attempts: self.max_attempts.min(HARD.max_attempts),
            max_duration_ms: self.max_duration_ms.min(HARD.max_duration_ms),
            max_worker_queues: self.max_worker_queues.min(HARD.max_worker_queues),
            max_worker_slots: self.max_worker_slots.min(HARD.max_worker_slots),
            max_cpu_milli: self.max_cpu_milli.min(HARD.max_cpu_milli),
            max_memory_mib: self.max_memory_mib.min(HARD.max_memory_mib),
            max_named_amount: self.max_named_amount.min(HARD.max_named_amount),
            max_named_resources: self.max_named_resources.min(HARD.max_named_resources),
        }
    }
}

/// A field path, built into a string only when a rejection needs it (validation runs for every
/// task of every batch; formatting paths eagerly was a measurable share of submit cost).
#[derive(Clone, Copy)]
pub enum Field<'a> {
    /// A top-level name.
    Root(&'a str),
    /// `parent.name`.
    Child(&'a Field<'a>, &'a str),
    /// `parent[i]`.
    Index(&'a Field<'a>, usize),
    /// `parent["key"]`.
    Key(&'a Field<'a>, &'a str),
}

impl std::fmt::Display for Field<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Field::Root(n) => f.write_str(n),
            Field::Child(p, n) => write!(f, "{p}.{n}"),
            Field::Index(p, i) => write!(f, "{p}[{i}]"),
            Field::Key(p, k) => write!(f, "{p}[{k:?}]"),
        }
    }
}

impl<'a> Field<'a> {
    fn child(&'a self, name: &'a str) -> Field<'a> {
        Field::Child(self, name)
    }
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '@' | '/')
}

/// A name-like field: non-empty, at most `max_name_bytes`, identifier characters.
pub fn ident(field: &str, value: &str, limits: &Limits) -> Result<(), Rejection> {
    ident_at(&Field::Root(field), value, limits)
}

fn ident_at(field: &Field, value: &str, limits: &Limits) -> Result<(), Rejection> {
    if value.is_empty() {
        return Err(Rejection::invalid(field.to_string(), "must not be empty"));
    }
    if value.len() > limits.max_name_bytes {
        return Err(Rejection::limit(
            field.to_string(),
            limits.max_name_bytes as u64,
            value.len() as u64,
        ));
    }
    if let Some(c) = value.chars().find(|c| !is_ident_char(*c)) {
        return Err(Rejection::invalid(
            field.to_string(),
            format!("character {c:?} not allowed (use letters, digits and . _ - : @ /)"),
        ));
    }
    Ok(())
}

/// A worker id.
pub fn worker_id(field: &str, id: &WorkerId) -> Result<(), Rejection> {
    ident(field, id.as_str(), &Limits { max_name_bytes: 128, ..HARD })
}

fn string_map(
    field: &Field,
    map: &BTreeMap<String, String>,
    limits: &Limits,
) -> Result<(), Rejection> {
    if map.len() > limits.max_map_entries {
        return Err(Rejection::limit(
            field.to_string(),
            limits.max_map_entries as u64,
            map.len() as u64,
        ));
    }
    for (k, v) in map {
        let f = Field::Key(field, k);
        ident_at(&f, k, limits)?;
        if v.len() > limits.max_value_bytes {
            return Err(Rejection::limit(
                f.to_string(),
                limits.max_value_bytes as u64,
                v.len() as u64,
            ));
        }
    }
    Ok(())
}

fn retry(field: &Field, r: &RetryPolicy, limits: &Limits) -> Result<(), Rejection> {
    if r.max_attempts == 0 {
        return Err(Rejection::invalid(
            field.child("max_attempts").to_string(),
            "must be at least 1 (1 = no retries)",
        ));
    }
    if r.max_attempts > limits.max_attempts {
        return Err(Rejection::limit(
            field.child("max_attempts").to_string(),
            limits.max_attempts as u64,
            r.max_attempts as u64,
        ));
    }
    if !(1000..=10_000).contains(&r.multiplier_permille) {
        return Err(Rejection::invalid(
            field.child("multiplier_permille").to_string(),
            "must be between 1000 (constant) and 10000 (x10)",
        ));
    }
    if r.initial_backoff_ms > r.max_backoff_ms {
        return Err(Rejection::invalid(
            field.child("initial_backoff_ms").to_string(),
            "must not exceed max_backoff_ms",
        ));
    }
    if r.max_backoff_ms > limits.max_duration_ms {
        return Err(too_long(field.child("max_backoff_ms"), r.max_backoff_ms, limits));
    }
    Ok(())
}

/// A duration beyond the longest one accepted is a malformed value (INVALID_ARGUMENT), not
/// an exhausted resource: no amount of waiting makes it acceptable.
fn too_long(field: Field<'_>, ms: u64, limits: &Limits) -> Rejection {
    Rejection::invalid(
        field.to_string(),
        format!(
            "{} is longer than the longest allowed, {}",
            fmt_ms(ms),
            fmt_ms(limits.max_duration_ms)
        ),
    )
}

/// `90061000` -> `1d 1h 1m 1s` (whole units, largest first; `0s` for zero).
pub fn fmt_ms(ms: u64) -> String {
    let mut left = ms / 1000;
    let mut parts = Vec::new();
    for (unit, secs) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if left >= secs {
            parts.push(format!("{}{unit}", left / secs));
            left %= secs;
        }
    }
    match (parts.is_empty(), ms % 1000) {
        (true, 0) => "0s".into(),
        (true, rest) => format!("{rest}ms"),
        (false, _) => parts.join(" "),
    }
}

/// A worker's capacity or a task's request: every amount at most its maximum and at most
/// [`Limits::max_named_resources`] names, each a valid identifier. The maxima keep every sum
/// the planner and apply compute far from overflow, and stop one registration from claiming
/// an absurd share of the cluster (a worker offering `u64::MAX` of everything).
///
/// Like an overlong duration, an amount beyond its maximum is a malformed value
/// (INVALID_ARGUMENT naming the field and the maximum), not an exhausted resource: no amount
/// of waiting makes it acceptable.
fn resources(field: &Field, r: &Resources, limits: &Limits) -> Result<(), Rejection> {
    let check = |f: Field, amount: u64, max: u64| {
        if amount > max {
            return Err(too_much(f, amount, max));
        }
        Ok(())
    };
    check(field.child("cpu_milli"), r.cpu_milli, limits.max_cpu_milli)?;
    check(field.child("memory_mib"), r.memory_mib, limits.max_memory_mib)?;
    if r.named.is_empty() {
        return Ok(());
    }
    check(field.child("named"), r.named.len() as u64, limits.max_named_resources as u64)?;
    for (name, &amount) in &r.named {
        let f = Field::Key(field, name);
        ident_at(&f, name, limits)?;
        check(f, amount, limits.max_named_amount)?;
    }
    Ok(())
}

fn too_much(field: Field<'_>, amount: u64, max: u64) -> Rejection {
    Rejection::invalid(field.to_string(), format!("{amount} exceeds the maximum of {max}"))
}

/// One task spec, without its dependencies. `now` bounds `not_before`.
pub fn task_spec(field: &str, spec: &TaskSpec, now: u64, limits: &Limits) -> Result<(), Rejection> {
    task_spec_at(&Field::Root(field), spec, now, limits)
}

fn task_spec_at(
    field: &Field,
    spec: &TaskSpec,
    now: u64,
    limits: &Limits,
) -> Result<(), Rejection> {
    ident_at(&field.child("name"), &spec.name, limits)?;
    ident_at(&field.child("queue"), &spec.queue, limits)?;
    if spec.payload.len() > limits.max_payload_bytes {
        return Err(Rejection::limit(
            field.child("payload").to_string(),
            limits.max_payload_bytes as u64,
            spec.payload.len() as u64,
        ));
    }
    if !spec.labels.is_empty() {
        string_map(&field.child("labels"), &spec.labels, limits)?;
    }
    if !spec.metadata.is_empty() {
        string_map(&field.child("metadata"), &spec.metadata, limits)?;
    }
    resources(&field.child("resources"), &spec.resources, limits)?;
    retry(&field.child("retry"), &spec.retry, limits)?;
    if let Some(t) = spec.timeout_ms {
        if t == 0 {
            return Err(Rejection::invalid(
                field.child("timeout_ms").to_string(),
                "must be positive (omit it for no timeout)",
            ));
        }
        if t > limits.max_duration_ms {
            return Err(too_long(field.child("timeout_ms"), t, limits));
        }
    }
    if let Some(nb) = spec.not_before {
        if nb > now.saturating_add(limits.max_duration_ms) {
            return Err(Rejection::invalid(
                field.child("not_before").to_string(),
                "is more than seven days in the future",
            ));
        }
    }
    if let Some(key) = &spec.idempotency_key {
        if key.is_empty() {
            return Err(Rejection::invalid(
                field.child("idempotency_key").to_string(),
                "must not be empty (omit it instead)",
            ));
        }
        if key.len() > limits.max_name_bytes {
            return Err(Rejection::limit(
                field.child("idempotency_key").to_string(),
                limits.max_name_bytes as u64,
                key.len() as u64,
            ));
        }
    }
    Ok(())
}

/// A submit batch: sizes, every spec, dependency shape inside the batch (self, duplicate and
/// out-of-range positions, cycles) and duplicate idempotency keys. Dependencies on existing
/// ids are checked against the state by apply.
pub fn submit_batch(tasks: &[NewTask], now: u64, limits: &Limits) -> Result<(), Rejection> {
    if tasks.is_empty() {
        return Err(Rejection::invalid("tasks", "must contain at least one task"));
    }
    if tasks.len() > limits.max_batch_tasks {
        return Err(Rejection::limit("tasks", limits.max_batch_tasks as u64, tasks.len() as u64));
    }
    let mut keys: HashMap<&str, usize> = HashMap::new();
    let root = Field::Root("tasks");
    for (i, t) in tasks.iter().enumerate() {
        let field = Field::Index(&root, i);
        task_spec_at(&field, &t.spec, now, limits)?;
        if t.delay_ms > limits.max_duration_ms {
            return Err(too_long(field.child("delay_ms"), t.delay_ms, limits));
        }
        if t.depends_on.len() > limits.max_deps {
            return Err(Rejection::limit(
                field.child("depends_on").to_string(),
                limits.max_deps as u64,
                t.depends_on.len() as u64,
            ));
        }
        if !t.depends_on.is_empty() {
            let deps = field.child("depends_on");
            let mut seen = std::collections::HashSet::with_capacity(t.depends_on.len());
            for (j, d) in t.depends_on.iter().enumerate() {
                let dfield = || Field::Index(&deps, j).to_string();
                if let DepRef::Batch(p) = d {
                    if *p as usize == i {
                        return Err(Rejection::invalid(dfield(), "a task cannot depend on itself"));
                    }
                    if *p as usize >= tasks.len() {
                        return Err(Rejection::invalid(
                            dfield(),
                            format!(
                                "batch position {p} is out of range (batch has {})",
                                tasks.len()
                            ),
                        ));
                    }
                }
                if !seen.insert(*d) {
                    return Err(Rejection::invalid(dfield(), "duplicate dependency"));
                }
            }
        }
        if let Some(k) = &t.spec.idempotency_key {
            if let Some(first) = keys.insert(k.as_str(), i) {
                return Err(Rejection::invalid(
                    field.child("idempotency_key").to_string(),
                    format!("duplicates the key of tasks[{first}]"),
                ));
            }
        }
    }
    topo_order(tasks).map(|_| ())
}

/// Batch positions in an order where every in-batch dependency comes first (Kahn's algorithm,
/// smallest position first for determinism). A cycle is refused with the positions involved.
pub fn topo_order(tasks: &[NewTask]) -> Result<Vec<u32>, Rejection> {
    let n = tasks.len();
    let mut indegree = vec![0u32; n];
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); n];
    for (i, t) in tasks.iter().enumerate() {
        for d in &t.depends_on {
            if let DepRef::Batch(p) = d {
                indegree[i] += 1;
                out[*p as usize].push(i as u32);
            }
        }
    }
    let mut ready: std::collections::BTreeSet<u32> =
        (0..n as u32).filter(|&i| indegree[i as usize] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &j in &out[i as usize] {
            indegree[j as usize] -= 1;
            if indegree[j as usize] == 0 {
                ready.insert(j);
            }
        }
    }
    if order.len() < n {
        let positions = (0..n as u32).filter(|&i| indegree[i as usize] > 0).collect();
        return Err(Rejection::DependencyCycle { positions });
    }
    Ok(order)
}

/// A worker's registration.
pub fn worker_spec(spec: &WorkerSpec, limits: &Limits) -> Result<(), Rejection> {
    worker_id("worker.id", &spec.id)?;
    let root = Field::Root("worker");
    if spec.queues.is_empty() {
        return Err(Rejection::invalid("worker.queues", "must name at least one queue"));
    }
    if spec.queues.len() > limits.max_worker_queues {
        return Err(Rejection::limit(
            "worker.queues",
            limits.max_worker_queues as u64,
            spec.queues.len() as u64,
        ));
    }
    let queues = root.child("queues");
    for (i, q) in spec.queues.iter().enumerate() {
        ident_at(&Field::Index(&queues, i), q, limits)?;
    }
    string_map(&root.child("labels"), &spec.labels, limits)?;
    resources(&root.child("capacity"), &spec.capacity, limits)?;
    if spec.slots == 0 {
        return Err(Rejection::invalid("worker.slots", "must be at least 1"));
    }
    if spec.slots > limits.max_worker_slots {
        return Err(Rejection::limit(
            "worker.slots",
            limits.max_worker_slots as u64,
            spec.slots as u64,
        ));
    }
    Ok(())
}

/// Truncate an error message to at most `max` bytes on a character boundary.
pub fn truncate_message(message: &str, max: usize) -> String {
    if message.len() <= max {
        return message.to_string();
    }
    let mut end = max;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message[..end].to_string()
}

#[cfg(test)]
mod tests {

    #[test]
    fn durations_beyond_the_limit_are_invalid_arguments_in_words() {
        let mut t = NewTask::new(TaskSpec::new("x"));
        t.delay_ms = 365 * 86_400_000;
        let e = submit_batch(&[t], 0, &HARD).unwrap_err();
        assert_eq!(
            e,
            Rejection::invalid("tasks[0].delay_ms", "365d is longer than the longest allowed, 7d")
        );
        assert_eq!(fmt_ms(90_061_000), "1d 1h 1m 1s");
        assert_eq!(fmt_ms(250), "250ms");
        assert_eq!(fmt_ms(0), "0s");
    }

    use super::*;

    fn nt(deps: Vec<DepRef>) -> NewTask {
        NewTask::with_deps(TaskSpec::new("t"), deps)
    }

    #[test]
    fn empty_batch_is_refused() {
        assert!(matches!(
            submit_batch(&[], 0, &HARD),
            Err(Rejection::InvalidArgument { field, .. }) if field == "tasks"
        ));
    }

    #[test]
    fn self_duplicate_and_out_of_range_positions_are_refused() {
        let e = submit_batch(&[nt(vec![DepRef::Batch(0)])], 0, &HARD).unwrap_err();
        assert_eq!(
            e,
            Rejection::invalid("tasks[0].depends_on[0]", "a task cannot depend on itself")
        );
        let e = submit_batch(&[nt(vec![]), nt(vec![DepRef::Batch(0), DepRef::Batch(0)])], 0, &HARD)
            .unwrap_err();
        assert_eq!(e, Rejection::invalid("tasks[1].depends_on[1]", "duplicate dependency"));
        let e = submit_batch(&[nt(vec![DepRef::Batch(5)])], 0, &HARD).unwrap_err();
        assert!(
            matches!(e, Rejection::InvalidArgument { field, .. } if field == "tasks[0].depends_on[0]")
        );
    }

    #[test]
    fn cycles_are_refused_with_their_positions() {
        let batch = vec![nt(vec![]), nt(vec![DepRef::Batch(2)]), nt(vec![DepRef::Batch(1)])];
        assert_eq!(
            submit_batch(&batch, 0, &HARD).unwrap_err(),
            Rejection::DependencyCycle { positions: vec![1, 2] }
        );
    }

    #[test]
    fn forward_references_are_ordered() {
        let batch = vec![nt(vec![DepRef::Batch(1)]), nt(vec![])];
        assert_eq!(topo_order(&batch).unwrap(), vec![1, 0]);
    }

    #[test]
    fn fields_are_named() {
        let mut t = nt(vec![]);
        t.spec.queue = "bad queue".into();
        let e = submit_batch(&[nt(vec![]), t], 0, &HARD).unwrap_err();
        assert!(matches!(e, Rejection::InvalidArgument { field, .. } if field == "tasks[1].queue"));

        let mut t = nt(vec![]);
        t.spec.payload = vec![0; 300 << 10];
        let e = submit_batch(&[t], 0, &Limits::default()).unwrap_err();
        assert_eq!(e, Rejection::limit("tasks[0].payload", 256 << 10, 300 << 10));

        let mut t = nt(vec![]);
        t.spec.retry.max_attempts = 0;
        let e = submit_batch(&[t], 0, &HARD).unwrap_err();
        assert!(
            matches!(e, Rejection::InvalidArgument { field, .. } if field == "tasks[0].retry.max_attempts")
        );
    }

    #[test]
    fn duplicate_keys_in_a_batch_are_refused() {
        let mut a = nt(vec![]);
        a.spec.idempotency_key = Some("k".into());
        let b = a.clone();
        let e = submit_batch(&[a, b], 0, &HARD).unwrap_err();
        assert!(
            matches!(e, Rejection::InvalidArgument { field, .. } if field == "tasks[1].idempotency_key")
        );
    }

    fn worker(capacity: Resources) -> WorkerSpec {
        WorkerSpec {
            id: WorkerId("w".into()),
            queues: vec!["default".into()],
            labels: BTreeMap::new(),
            capacity,
            slots: 1,
        }
    }

    #[test]
    fn worker_capacity_is_bounded_per_resource_and_named_count() {
        let l = Limits::default();
        let at_max = Resources {
            cpu_milli: l.max_cpu_milli,
            memory_mib: l.max_memory_mib,
            named: BTreeMap::from([("gpu".to_string(), l.max_named_amount)]),
        };
        assert_eq!(worker_spec(&worker(at_max.clone()), &l), Ok(()));

        let mut r = at_max.clone();
        r.cpu_milli += 1;
        assert_eq!(
            worker_spec(&worker(r), &l),
            Err(Rejection::invalid(
                "worker.capacity.cpu_milli",
                format!("{} exceeds the maximum of {}", l.max_cpu_milli + 1, l.max_cpu_milli)
            ))
        );
        let mut r = at_max.clone();
        r.memory_mib = u64::MAX;
        assert_eq!(
            worker_spec(&worker(r), &l),
            Err(Rejection::invalid(
                "worker.capacity.memory_mib",
                format!("{} exceeds the maximum of {}", u64::MAX, l.max_memory_mib)
            ))
        );
        let mut r = at_max.clone();
        r.named.insert("gpu".into(), u64::MAX);
        assert_eq!(
            worker_spec(&worker(r), &l),
            Err(Rejection::invalid(
                "worker.capacity[\"gpu\"]",
                format!("{} exceeds the maximum of {}", u64::MAX, l.max_named_amount)
            ))
        );
        let mut r = at_max;
        r.named = (0..=l.max_named_resources).map(|i| (format!("r{i}"), 1)).collect();
        assert_eq!(
            worker_spec(&worker(r), &l),
            Err(Rejection::invalid(
                "worker.capacity.named",
                format!(
                    "{} exceeds the maximum of {}",
                    l.max_named_resources + 1,
                    l.max_named_resources
                )
            ))
        );
    }

    #[test]
    fn task_requests_are_bounded_like_capacities() {
        let l = Limits::default();
        let mut t = nt(vec![]);
        t.spec.resources.cpu_milli = u64::MAX;
        assert_eq!(
            submit_batch(&[t], 0, &l),
            Err(Rejection::invalid(
                "tasks[0].resources.cpu_milli",
                format!("{} exceeds the maximum of {}", u64::MAX, l.max_cpu_milli)
            ))
        );
        let mut t = nt(vec![]);
        t.spec.resources.named.insert("gpu".into(), l.max_named_amount + 1);
        assert_eq!(
            submit_batch(&[t], 0, &l),
            Err(Rejection::invalid(
                "tasks[0].resources[\"gpu\"]",
                format!("{} exceeds the maximum of {}", l.max_named_amount + 1, l.max_named_amount)
            ))
        );
        let mut t = nt(vec![]);
        t.spec.resources.named.insert("bad name".into(), 1);
        assert!(matches!(
            submit_batch(&[t], 0, &l),
            Err(Rejection::InvalidArgument { field, .. }) if field == "tasks[0].resources[\"bad name\"]"
        ));
    }

    #[test]
    fn the_defaults_are_within_the_hard_limits_and_sums_cannot_overflow() {
        assert_eq!(Limits::default().clamped(), Limits::default());
        // A full worker's worth of the largest tasks, summed, stays far below u64::MAX.
        let most = HARD.max_worker_slots as u128 * HARD.max_cpu_milli as u128;
        assert!(most < u64::MAX as u128);
        let most = HARD.max_worker_slots as u128 * HARD.max_named_amount as u128;
        assert!(most < u64::MAX as u128);
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate_message("héllo", 2), "h");
        assert_eq!(truncate_message("abc", 10), "abc");
    }
}
