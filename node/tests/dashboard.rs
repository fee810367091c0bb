//! The dashboard in a real browser: Debian's headless Chromium (CDP over a pipe) opens a
//! follower's dashboard against a real 3-node cluster and sees the leader and members, the
//! submitted tasks, the worker, a task's DAG and result, and a state change arriving live
//! over server-sent events without a reload. Screenshots land in
//! `target/dashboard-screenshots/`. Skipped, loudly, only when `/usr/bin/chromium` is absent
//! (`.ci/run` installs it).

mod browser;
mod common;

use std::time::Duration;

use browser::{screenshot_dir, Browser, CHROMIUM};
use client::local::{LocalCluster, LocalClusterOptions};
use client::pki::TokenSpec;
use common::{library_client, submit, Cluster, TestWorker};
use proto::pb;

const WITHIN: Duration = Duration::from_secs(30);

fn task(name: &str) -> pb::TaskSpec {
    pb::TaskSpec {
        name: name.into(),
        idempotency_key: format!("dash-{name}"),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dashboard_shows_the_cluster_and_follows_changes_live() {
    if !Browser::available() {
        eprintln!(
            "\n!!!!!!!! SKIPPED dashboard browser test: {CHROMIUM} is missing \
             (apt-get install -y chromium; .ci/run does this) !!!!!!!!\n"
        );
        return;
    }
    let c = std::sync::Arc::new(Cluster::start(3, &[]).await);
    let cluster_view = c.clone();
    let leader = c.wait_leader().await;
    let follower = (leader + 1) % 3;
    let http = c.nodes[follower].http.clone().expect("an http port");
    let addrs = c.addrs();
    let client = library_client(addrs.clone());

    let _worker = TestWorker::spawn(addrs.clone(), "dash-worker-1", 2, Duration::from_millis(100));
    let mut transform = task("transform");
    transform.depends_on_batch = vec![0];
    let dag = submit(&addrs, vec![task("extract"), transform]).await;
    for id in &dag {
        let t = client.wait_task(*id).await.expect("the DAG finishes");
        assert_eq!(t.state, pb::TaskState::Succeeded as i32);
    }
    // Nobody serves queue "parked": this one waits until the test cancels it.
    let mut parked = task("parked");
    parked.queue = "parked".into();
    let parked = submit(&addrs, vec![parked]).await[0];

    let shots = screenshot_dir();
    let handle = tokio::runtime::Handle::current();
    let cancel_client = client.clone();
    tokio::task::spawn_blocking(move || {
        let mut b = Browser::launch();
        b.navigate(&format!("http://{http}/#/"));
        // Leadership may move meanwhile (a loaded machine): the page must show the leader the
        // cluster reports now; the overview refreshes by itself.
        let deadline = std::time::Instant::now() + WITHIN;
        loop {
            let leader_id = handle.block_on(async {
                let c = &cluster_view;
                c.nodes[c.local.wait_leader(Duration::from_secs(10)).await.expect("a leader")].id
            });
            let shown = b.eval(&format!(
                "document.querySelector('#leader') !== null && \
                 document.querySelector('#leader').textContent === 'node {leader_id}' && \
                 document.querySelectorAll('#members tbody tr').length === 3"
            ));
            if shown == serde_json::json!(true) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the page never showed leader {leader_id}");
            std::thread::sleep(Duration::from_millis(200));
        }
        b.wait_for(
            "the tasks per state",
            "Number(document.querySelector('#task-counts [data-state=succeeded] b').textContent) >= 2 && \
             Number(document.querySelector('#task-counts [data-state=queued] b').textContent) >= 1",
            WITHIN,
        );
        assert_eq!(
            b.eval("getComputedStyle(document.getElementById('login')).display"),
            serde_json::json!("none"),
            "no token prompt without authentication"
        );
        b.wait_for("the throughput chart", "document.querySelector('#throughput rect') !== null", WITHIN);
        b.screenshot(&shots.join("overview.png"));

        b.navigate(&format!("http://{http}/#/workers"));
        b.wait_for(
            "the worker",
            "document.querySelector('#workers-table tr[data-worker=\"dash-worker-1\"][data-status=alive]') !== null",
            WITHIN,
        );
        b.screenshot(&shots.join("workers.png"));

        b.navigate(&format!("http://{http}/#/tasks"));
        let row = |id: u64, state: &str| {
            format!("document.querySelector('#task-table tr[data-id=\"{id}\"][data-state=\"{state}\"]') !== null")
        };
        b.wait_for("the submitted tasks", &format!("{} && {} && {}", row(dag[0], "succeeded"), row(dag[1], "succeeded"), row(parked, "queued")), WITHIN);
        b.wait_for("the live stream", "document.querySelector('#live').textContent === 'live'", WITHIN);
        b.screenshot(&shots.join("tasks.png"));
        // Mark this page load, change the task behind the page's back, and see it arrive.
        b.eval("window.__sameLoad = 4242; true");
        let batches_before = b.eval("window.__raftsched.liveBatches").as_u64().unwrap_or(0);
        handle.block_on(async {
            cancel_client.cancel(parked, "cancelled by the dashboard test").await.expect("cancel")
        });
        b.wait_for(
            "the cancellation to show up live",
            &format!(
                "{} && window.__sameLoad === 4242 && window.__raftsched.liveBatches > {batches_before}",
                row(parked, "cancelled")
            ),
            WITHIN,
        );
        b.screenshot(&shots.join("tasks-live.png"));

        // Paging, newest first, one task a page: older, older, then newer again.
        let only = |id: u64| {
            format!(
                "document.querySelectorAll('#task-table tbody tr[data-id]').length === 1 && \
                 document.querySelector('#task-table tr[data-id=\"{id}\"]') !== null"
            )
        };
        b.navigate(&format!("http://{http}/#/tasks?limit=1"));
        b.wait_for("the first page", &only(parked), WITHIN);
        b.eval("document.getElementById('page-older').click(); true");
        b.wait_for("the second page", &only(dag[1]), WITHIN);
        b.eval("document.getElementById('page-older').click(); true");
        b.wait_for("the third page", &only(dag[0]), WITHIN);
        b.eval("document.getElementById('page-newer').click(); true");
        b.wait_for("the second page again", &only(dag[1]), WITHIN);

        b.navigate(&format!("http://{http}/#/task/{}", dag[1]));
        b.wait_for(
            "the task page with its DAG, explanation and result",
            "document.querySelectorAll('#dag .dag-node').length === 2 && \
             document.querySelector('#dag .dag-node.current') !== null && \
             document.querySelector('#explain').textContent.length > 0 && \
             document.querySelector('#result').textContent.includes('done') && \
             document.querySelectorAll('#timeline li').length >= 3",
            WITHIN,
        );
        b.screenshot(&shots.join("task.png"));
    })
    .await
    .expect("the browser script");
}

/// With TLS and tokens: the page asks for a token, a reader sees tasks but no cancel button
/// and no fencing token, a submitter cancels from the page and sees the change live, then
/// retries the cancelled task from the page.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dashboard_asks_for_a_token_and_offers_actions_by_role() {
    if !Browser::available() {
        eprintln!(
            "\n!!!!!!!! SKIPPED dashboard browser test: {CHROMIUM} is missing \
             (apt-get install -y chromium; .ci/run does this) !!!!!!!!\n"
        );
        return;
    }
    let opts = LocalClusterOptions::new(env!("CARGO_BIN_EXE_schedulerd"), 3)
        .env("SCHED_LOG", "info,openraft=warn")
        .http(true)
        .secure([TokenSpec::new("ci", "submitter"), TokenSpec::new("dash", "reader")]);
    let mut c = LocalCluster::start(opts).await.expect("a secure cluster starts");
    let sec = c.security().unwrap().clone();
    let leader = c.wait_leader(Duration::from_secs(30)).await.unwrap();
    let http = c.nodes[leader].http.clone().unwrap();
    let mut cfg = sec.client_config(&c.endpoints(), Some("admin"));
    cfg.retry_budget = Duration::from_secs(20);
    let client = client::Client::with_config(cfg).unwrap();
    let mut parked = task("parked-secure");
    parked.queue = "parked".into();
    let parked = client.submit(parked).await.unwrap().id;
    let (reader, submitter) =
        (sec.secret("dash").unwrap().to_string(), sec.secret("ci").unwrap().to_string());

    let shots = screenshot_dir();
    tokio::task::spawn_blocking(move || {
        // The test CA is not in the browser's store; the page is what is under test here.
        let mut b = Browser::launch_with(&["--ignore-certificate-errors"]);
        b.navigate(&format!("https://{http}/#/tasks"));
        b.wait_for(
            "the token prompt",
            "getComputedStyle(document.getElementById('login')).display !== 'none'",
            WITHIN,
        );
        b.screenshot(&shots.join("login.png"));
        let login = |b: &mut Browser, secret: &str| {
            b.eval(&format!(
                "document.getElementById('token-input').value = {secret:?}; \
                 document.getElementById('login-form').requestSubmit(); true"
            ));
        };
        login(&mut b, &reader);
        b.wait_for(
            "the reader's view of the tasks",
            &format!(
                "document.querySelector('#who').textContent.includes('dash (reader)') && \
                 document.querySelector('#task-table tr[data-id=\"{parked}\"][data-state=queued]') !== null && \
                 getComputedStyle(document.getElementById('login')).display === 'none'"
            ),
            WITHIN,
        );
        b.navigate(&format!("https://{http}/#/task/{parked}"));
        b.wait_for(
            "a task page without actions or fences for a reader",
            "document.querySelector('#explain') !== null && \
             document.querySelector('#explain').textContent.length > 0 && \
             document.querySelector('#cancel-task') === null && \
             document.querySelector('main').textContent.includes('hidden (admins only)')",
            WITHIN,
        );
        // A wrong token is refused and asked for again.
        b.eval("sessionStorage.setItem('raftsched.token', 'not-a-token'); location.reload(); true");
        b.wait_for(
            "the prompt again for a refused token",
            "getComputedStyle(document.getElementById('login')).display !== 'none' && \
             document.getElementById('login-error').textContent.length > 0",
            WITHIN,
        );
        login(&mut b, &submitter);
        b.wait_for("the cancel button for a submitter", "document.querySelector('#cancel-task') !== null", WITHIN);
        b.eval("window.confirm = () => true; document.querySelector('#cancel-task').click(); true");
        b.wait_for(
            "the cancellation on the page",
            "document.querySelector('h1 [data-state=cancelled]') !== null && \
             document.querySelector('#cancel-task') === null",
            WITHIN,
        );
        b.screenshot(&shots.join("task-cancelled.png"));
        // The cancelled task offers Retry; it runs again (queued) and the button goes away.
        b.wait_for("the retry button", "document.querySelector('#retry-task') !== null", WITHIN);
        b.eval("window.confirm = () => true; document.querySelector('#retry-task').click(); true");
        b.wait_for(
            "the retried task on the page",
            "document.querySelector('h1 [data-state=queued]') !== null && \
             document.querySelector('#retry-task') === null && \
             document.querySelector('#cancel-task') !== null",
            WITHIN,
        );
    })
    .await
    .expect("the browser script");
    let t = client.get_task(parked).await.unwrap();
    assert_eq!(t.state, pb::TaskState::Queued as i32, "cancelled, then retried from the page");
    assert_eq!(t.cancel_reason, "", "{t:?}");
    for i in 0..3 {
        assert!(c.nodes[i].is_running(), "node {i} died");
        c.wait_serving(i, Duration::from_secs(10)).await.expect("still serving");
    }
}
