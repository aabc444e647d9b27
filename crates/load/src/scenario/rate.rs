//! `rate`: open loop. Every client sends `--rate` messages a second for
//! `--duration`, the send times spread evenly over the clients, whether or
//! not the server keeps up; latency is measured from the scheduled send time.
//! The sending is the [`pacer`](super::pacer)'s; the clients here only receive.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::net::TcpStream;

use super::coordinator::{
    collect, connect_client, connection_notes, ending_note, fill_deliveries, framing_for,
    settle_for_protocol, Ending, Meter, Progress, POLL,
};
use super::pacer::pace;
use super::{params, Options};
use crate::client::{run_client, Conn, Plan, Receiver, Shared, READ_CHUNK};
use crate::payload::{now_ns, ns_since_origin, Codec};
use crate::proc;
use crate::report::{self, Latency, Params, Report};
use crate::tls::Stream;

/// `rate`: open loop at a fixed rate per client, spread evenly.
pub(super) async fn run(opts: &Options) -> anyhow::Result<Report> {
    open_loop(opts, None).await
}

/// The open loop, with `flooder` (connected before the others) flooding
/// from the start to the end of the run if given: the `flood` scenario.
pub(super) async fn open_loop(opts: &Options, flooder: Option<Conn>) -> anyhow::Result<Report> {
    let n = opts.clients;
    if !(opts.rate.is_finite() && opts.rate > 0.0) {
        bail!("--rate must be a positive number of messages per second");
    }
    let per_client = ((opts.rate * opts.duration.as_secs_f64()).round() as u64).max(1);
    if per_client > u64::from(u32::MAX) {
        bail!("--rate × --duration is too many messages");
    }
    let codec = Codec::for_this_run(opts.size)?;
    let offered = n as f64 * n as f64 * opts.rate;
    let mut report = Report::new(
        if flooder.is_some() { "flood" } else { "rate" },
        opts.target.clone(),
        Params {
            rate_per_client: Some(opts.rate),
            duration_s: Some(opts.duration.as_secs_f64()),
            messages: Some(per_client),
            ..params(opts)
        },
    );
    proc::ensure_open_files(n as u64 + 64)?;

    let shared = Arc::new(Shared::default());
    let _stop_on_exit = shared.stop.clone().drop_guard();
    let expect = n as u64 * per_client;
    let mut handles = Vec::with_capacity(n);
    let mut writers = Vec::with_capacity(n);
    let mut framings = Vec::with_capacity(n);
    for i in 0..n {
        let mut conn = connect_client(opts, i, READ_CHUNK).await?;
        framings.push(framing_for(opts, &conn.who, &codec));
        if let Some(publisher) = conn.publisher.take() {
            // Redis: the pacer owns the publishing connection outright
            // (still non-blocking after `into_std`).
            writers.push(publisher.into_std().context("detaching a socket")?);
        } else {
            // A second handle on the same socket for the pacer thread; both
            // share the non-blocking flag, so the pacer's writes never block.
            let Stream::Tcp(tcp) = conn.stream else {
                bail!("the rate scenario does not run over TLS");
            };
            let std_stream = tcp.into_std().context("detaching a socket")?;
            writers.push(std_stream.try_clone().context("duplicating a socket")?);
            conn.stream =
                Stream::Tcp(TcpStream::from_std(std_stream).context("re-attaching a socket")?);
        }
        let plan = Plan {
            id: i as u32,
            messages: 0,
            window: 0,
            expect,
            framing: framing_for(opts, &conn.who, &codec),
            // The pacer writes on this socket too; a PONG could land inside
            // one of its partial writes. NATS pings every 2 minutes and
            // closes after two unanswered ones, far beyond a rate run.
            answer_pings: false,
        };
        let receiver = Receiver::new(i as u32, n, codec.clone()).speaking(opts.protocol);
        handles.push(tokio::spawn(run_client(
            conn,
            plan,
            receiver,
            codec.clone(),
            shared.clone(),
        )));
    }
    settle_for_protocol(opts, &mut report, || shared.arrivals.load(Relaxed)).await;

    let meter = Meter::start(&opts.server_pids)?;
    // Start a little ahead so that the first ticks are not already late.
    let t0 = Instant::now() + Duration::from_millis(5);
    let t0_ns = ns_since_origin(t0);
    shared.start.cancel();
    let flooding = flooder.map(|conn| tokio::spawn(super::flood::flood(conn, shared.stop.clone())));
    if let Some(started) = &opts.sending_started {
        started.cancel();
    }
    let abort = Arc::new(AtomicBool::new(false));
    let pacer = {
        let (codec, shared, abort) = (codec.clone(), shared.clone(), abort.clone());
        let rate = opts.rate;
        thread::Builder::new()
            .name("chat-load-pacer".into())
            .spawn(move || {
                pace(
                    writers, framings, codec, per_client, rate, t0_ns, shared, abort,
                )
            })
            .context("cannot start the pacer thread")?
    };
    // Make sure the pacer stops if we return early.
    struct AbortOnDrop(Arc<AtomicBool>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Relaxed);
        }
    }
    let _abort_on_exit = AbortOnDrop(abort.clone());

    let mut progress = Progress::new(opts.progress);
    let mut last_delivered = 0;
    let mut last_progress = Instant::now();
    let mut sending_done_at: Option<Instant> = None;
    let ending = loop {
        tokio::time::sleep(POLL).await;
        if shared.finished.load(Relaxed) >= n {
            break Ending::Complete;
        }
        let now = Instant::now();
        let delivered = shared.delivered.load(Relaxed);
        progress.tick("delivered", delivered, || {
            format!(", offered {}/s", report::si(offered))
        });
        if delivered != last_delivered {
            last_delivered = delivered;
            last_progress = now;
        }
        if sending_done_at.is_none() && pacer.is_finished() {
            sending_done_at = Some(now);
            last_progress = now;
        }
        if let Some(done) = sending_done_at {
            if delivered >= shared.sent.load(Relaxed) * n as u64 {
                break Ending::Complete;
            }
            if now.duration_since(last_progress) >= opts.drain {
                break Ending::Stalled;
            }
            // A backlog gets at most as long as the sending itself.
            if now.duration_since(done) >= opts.duration.max(opts.drain) {
                break Ending::TimeBound { stalled: false };
            }
        }
    };
    let gave_up_ns = now_ns();
    let measured = meter.finish(&mut report.notes);
    abort.store(true, Relaxed);
    let paced = match tokio::task::spawn_blocking(move || pacer.join()).await {
        Ok(Ok(paced)) => paced,
        _ => bail!("the pacer thread panicked"),
    };
    shared.stop.cancel();
    let mut merged = collect(handles).await;
    merged.sent = paced.sent;
    if let Some(flooding) = flooding {
        report.flood = Some(
            flooding
                .await
                .map_err(|err| anyhow::anyhow!("the flooder task: {err}"))?,
        );
    }

    let end_ns = match ending {
        Ending::Complete => merged.last_delivery_ns,
        _ => gave_up_ns,
    };
    let elapsed = (end_ns.saturating_sub(t0_ns) as f64 / 1e9).max(1e-9);
    fill_deliveries(
        &mut report,
        &merged,
        n,
        expect,
        elapsed,
        Some(offered),
        ending,
    );
    report.complete = ending == Ending::Complete && paced.sent == expect;
    ending_note(&mut report, ending, opts, expect * n as u64);
    report.send_lag_us = Latency::of(&paced.lag);
    report.server = measured.usage(Some(merged.counts.delivered));
    report.tool_cpu_s = measured.tool_cpu_s;
    if paced.stalls > 0 {
        report.notes.push(format!(
            "{} sends found the socket full: the server fell behind reading",
            paced.stalls
        ));
    }
    if let Some(first) = paced.errors.first() {
        report.notes.push(format!(
            "{} send error(s), the first: {first}",
            paced.errors.len()
        ));
    }
    if let Some(lag) = &report.send_lag_us {
        if lag.p99 > 1000 {
            report.notes.push(format!(
                "the tool sent late (send lag p99 {}): latency includes its lateness",
                report::micros(lag.p99)
            ));
        }
    }
    connection_notes(&merged, &mut report.notes);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use chat_server::harness::TestServer;
    use chat_server::Config;

    use super::super::test_support::{assert_complete, small, small_broker};
    use super::super::{run, Scenario};
    use crate::protocol::Protocol;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_open_loop_run_keeps_its_schedule() {
        let server = TestServer::start(Config::default()).unwrap();
        let mut opts = small(Scenario::Rate, &server);
        opts.rate = 50.0;
        opts.duration = Duration::from_millis(200);
        let report = run(Scenario::Rate, &opts).await.unwrap();
        assert_complete(&report, (30, 90, 0, 0));
        let offered = report.deliveries.as_ref().and_then(|d| d.offered_per_s);
        assert_eq!(offered, Some(450.0));
        assert!(report.elapsed_s >= 0.19, "{}", report.elapsed_s);
    }

    async fn rate_over(protocol: Protocol) {
        let Some((mut opts, _broker)) = small_broker(Scenario::Rate, protocol) else {
            return;
        };
        opts.rate = 50.0;
        opts.duration = Duration::from_millis(200);
        let report = run(Scenario::Rate, &opts).await.unwrap();
        assert_complete(&report, (30, 90, 0, 0));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_open_loop_run_over_nats_loses_nothing() {
        rate_over(Protocol::Nats).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_open_loop_run_over_redis_loses_nothing() {
        rate_over(Protocol::Redis).await;
    }
}
