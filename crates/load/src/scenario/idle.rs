//! `idle`: n idle connections and the server memory they cost, measured
//! once the arrival announcements have settled and again after `--hold`.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use anyhow::Context;

use super::coordinator::{connect_counters, settle, Meter, SETTLE_QUIET};
use super::{params, Options};
use crate::client::CounterShared;
use crate::proc::{self, Proc};
use crate::report::{Idle, Report};

/// `idle`: n idle connections and the server memory they cost.
pub(super) async fn run(opts: &Options) -> anyhow::Result<Report> {
    let n = opts.clients;
    let mut report = Report::new("idle", opts.target.clone(), params(opts));
    proc::ensure_open_files(n as u64 + 64)?;
    let rss = || -> anyhow::Result<Option<u64>> {
        if opts.server_pids.is_empty() {
            return Ok(None);
        }
        let mut sum = 0;
        for &pid in &opts.server_pids {
            sum += Proc::Pid(pid).memory()?.rss_kib;
        }
        Ok(Some(sum))
    };
    let rss_before = rss().context("--server-pid")?;
    let meter = Meter::start(&opts.server_pids)?;

    let shared = Arc::new(CounterShared::default());
    let _stop_on_exit = shared.stop.clone().drop_guard();
    let expected = n as u64 * (n as u64 - 1) / 2;
    let (handles, connect_time) = connect_counters(opts, &shared, expected).await?;
    if let Some(got) = settle(
        || shared.lines.load(Relaxed),
        expected,
        opts.drain.max(SETTLE_QUIET),
    )
    .await
    {
        report.complete = false;
        report.notes.push(format!(
            "announcements settled at {got} of {expected}: some clients never heard of some arrivals"
        ));
    }
    let rss_settled = rss().context("--server-pid")?;
    let elapsed = meter.elapsed().as_secs_f64();
    let measured = meter.finish(&mut report.notes);
    tokio::time::sleep(opts.hold).await;
    let rss_held = rss().context("--server-pid")?;
    let announcements = shared.lines.load(Relaxed);
    let dropped_while_idle = shared.lost.load(Relaxed);

    shared.stop.cancel();
    for handle in handles {
        let _ = handle.await;
    }
    // Closed; give the server as long again to process n departures.
    tokio::time::sleep(opts.hold).await;
    let rss_closed = rss().ok().flatten();

    let per = |after: Option<u64>| match (rss_before, after) {
        (Some(before), Some(after)) => Some((after as f64 - before as f64) / n as f64),
        _ => None,
    };
    report.elapsed_s = elapsed;
    report.idle = Some(Idle {
        connections: n,
        connect_per_s: n as f64 / connect_time.as_secs_f64().max(1e-9),
        announcements,
        announcements_expected: expected,
        dropped: dropped_while_idle,
        rss_before_kib: rss_before,
        rss_settled_kib: rss_settled,
        rss_held_kib: rss_held,
        rss_closed_kib: rss_closed,
        per_connection_kib: per(rss_settled),
        per_connection_held_kib: per(rss_held),
        hold_s: opts.hold.as_secs_f64(),
    });
    report.server = measured.usage(Some(announcements));
    report.tool_cpu_s = measured.tool_cpu_s;
    if dropped_while_idle > 0 {
        report.complete = false;
        report.notes.push(format!(
            "the server closed {dropped_while_idle} idle connection(s)"
        ));
    }
    report.notes.push(
        "server CPU covers connecting and delivering the announcements; per delivery = per announcement"
            .to_owned(),
    );
    Ok(report)
}
