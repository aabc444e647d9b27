//! `churn`: join-and-leave cycles per second (`--window` churners at once)
//! with n idle clients present that hear every arrival and departure;
//! latency is join latency, connect until greeted.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::coordinator::{
    arrivals_due, connect_counters, settle, settle_arrivals, Meter, Progress,
};
use super::{params, Options};
use crate::client::{self, new_histogram, CounterShared};
use crate::proc;
use crate::report::{Churn, Latency, Params, Report, ServerUsage};

/// `churn`: join-and-leave cycles with n idle clients present.
pub(super) async fn run(opts: &Options) -> anyhow::Result<Report> {
    let n = opts.clients;
    let concurrency = opts.window.max(1);
    let mut report = Report::new(
        "churn",
        opts.target.clone(),
        Params {
            messages: (opts.messages > 0).then_some(opts.messages),
            window: Some(concurrency),
            duration_s: Some(opts.duration.as_secs_f64()),
            ..params(opts)
        },
    );
    proc::ensure_open_files(n as u64 + u64::from(concurrency) + 64)?;
    let shared = Arc::new(CounterShared::default());
    let _stop_on_exit = shared.stop.clone().drop_guard();
    let (handles, _) = connect_counters(opts, &shared, arrivals_due(n)).await?;
    settle_arrivals(&mut report, n, || shared.lines.load(Relaxed)).await;
    let baseline = shared.lines.load(Relaxed);

    let meter = Meter::start(&opts.server_pids)?;
    let t0 = Instant::now();
    let deadline = t0 + opts.duration;
    let budget = Arc::new(AtomicU64::new(if opts.messages > 0 {
        opts.messages
    } else {
        u64::MAX
    }));
    let cycles = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut churners = Vec::new();
    for churner in 0..concurrency {
        let (budget, cycles, failed) = (budget.clone(), cycles.clone(), failed.clone());
        let addr = opts.addr_for(churner as usize);
        churners.push(tokio::spawn(async move {
            let mut latency = new_histogram();
            let mut first_error = None;
            // Take one cycle from the budget, never wrapping below zero.
            let take = || {
                budget
                    .fetch_update(Relaxed, Relaxed, |left| left.checked_sub(1))
                    .is_ok()
            };
            while Instant::now() < deadline && take() {
                let start = Instant::now();
                match client::connect(addr, 512, None).await {
                    Ok(conn) => {
                        let _ = latency.record(start.elapsed().as_micros() as u64);
                        drop(conn);
                        cycles.fetch_add(1, Relaxed);
                    }
                    Err(err) => {
                        first_error.get_or_insert_with(|| format!("{err:#}"));
                        // Bounded: a refusing server must not make us spin.
                        if failed.fetch_add(1, Relaxed) >= 1000 {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (latency, first_error)
        }));
    }
    let mut progress = Progress::new(opts.progress);
    while !churners.iter().all(|c| c.is_finished()) {
        tokio::time::sleep(Duration::from_millis(10)).await;
        progress.tick("cycles", cycles.load(Relaxed), String::new);
    }
    let elapsed = t0.elapsed().as_secs_f64().max(1e-9);
    let mut latency = new_histogram();
    for churner in churners {
        if let Ok((histogram, error)) = churner.await {
            let _ = latency.add(&histogram);
            if let Some(error) = error {
                report.notes.push(format!("a join failed: {error}"));
            }
        }
    }
    let cycles = cycles.load(Relaxed);
    // Every cycle owes each idle client an arrival and a departure.
    let expected = baseline + 2 * n as u64 * cycles;
    settle(|| shared.lines.load(Relaxed), expected, opts.drain).await;
    let got = shared.lines.load(Relaxed);
    let measured = meter.finish(&mut report.notes);
    shared.stop.cancel();
    let mut dropped = 0;
    for handle in handles {
        if !matches!(handle.await, Ok(true)) {
            dropped += 1;
        }
    }
    report.elapsed_s = elapsed;
    report.churn = Some(Churn {
        idle_clients: n,
        concurrency,
        cycles,
        per_s: cycles as f64 / elapsed,
        missing_announcements: expected.saturating_sub(got),
        failed_cycles: failed.load(Relaxed),
    });
    report.latency_us = Latency::of(&latency);
    report.server = measured.usage(None).map(|s| ServerUsage {
        cpu_ns_per_cycle: (cycles > 0).then(|| s.cpu_s * 1e9 / cycles as f64),
        ..s
    });
    report.tool_cpu_s = measured.tool_cpu_s;
    report.complete = got >= expected && failed.load(Relaxed) == 0;
    report
        .notes
        .push("latency is join latency: connect until the greeting arrives".to_owned());
    if dropped > 0 {
        report
            .notes
            .push(format!("the server closed {dropped} idle client(s)"));
    }
    Ok(report)
}
