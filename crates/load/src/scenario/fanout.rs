//! `fanout`: n clients each send m messages with `--window` of their own
//! in flight, and everyone receives everything (closed loop). The same
//! exchange, with one more client that never reads, is the `slow` scenario
//! ([`super::slow`]), so [`exchange`] lives here and serves both.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};

use super::coordinator::{
    collect, connect_client, connection_notes, ending_note, fill_deliveries, framing_for,
    settle_for_protocol, Ending, Meter, Progress, POLL,
};
use super::{params, Options};
use crate::client::{run_client, Plan, Receiver, Shared, READ_CHUNK};
use crate::payload::{now_ns, ns_since_origin, Codec};
use crate::proc;
use crate::report::{Params, Report};

/// Runs `fanout`.
pub(super) async fn run(opts: &Options) -> anyhow::Result<Report> {
    Ok(exchange(opts, None).await?.report)
}

/// What an exchange leaves for the `slow` scenario to finish its report with.
pub(super) struct Exchanged {
    pub(super) report: Report,
    /// When the watched client's departure was announced, in ns since the origin.
    pub(super) watched_left_ns: Option<u64>,
    /// When the clients were told to start, in ns since the origin.
    pub(super) t0_ns: u64,
}

/// Refuses options an exchange cannot run with and makes room for its
/// sockets; called before anything connects.
pub(super) fn check(opts: &Options) -> anyhow::Result<()> {
    if opts.window == 0 {
        bail!("--window must be at least 1");
    }
    proc::ensure_open_files(opts.clients as u64 + 64)?;
    Ok(())
}

/// `fanout` and `slow`: n clients exchange m messages each with a window.
/// `slow_who` is the never-reading client of `slow`, already connected:
/// the clients watch for its departure, and a stall does not end the run.
pub(super) async fn exchange(opts: &Options, slow_who: Option<&str>) -> anyhow::Result<Exchanged> {
    let with_slow = slow_who.is_some();
    let n = opts.clients;
    let m = u32::try_from(opts.messages).context("-m is too large")?;
    let codec = Codec::for_this_run(opts.size)?;
    let scenario = if with_slow { "slow" } else { "fanout" };
    let mut report = Report::new(
        scenario,
        opts.target.clone(),
        Params {
            messages: Some(opts.messages),
            window: Some(opts.window),
            duration_s: Some(opts.duration.as_secs_f64()),
            ..params(opts)
        },
    );
    check(opts)?;

    let shared = Arc::new(Shared::default());
    // Whatever happens (an error, Ctrl-C), the clients stop with us.
    let _stop_on_exit = shared.stop.clone().drop_guard();
    let mut handles = Vec::with_capacity(n);
    let expect = n as u64 * u64::from(m);
    for i in 0..n {
        let conn = connect_client(opts, i, READ_CHUNK).await?;
        let mut receiver = Receiver::new(i as u32, n, codec.clone()).speaking(opts.protocol);
        if let Some(who) = slow_who {
            receiver.watch_departure_of(who);
        }
        let plan = Plan {
            id: i as u32,
            messages: m,
            window: opts.window,
            expect,
            framing: framing_for(opts, &conn.who, &codec),
            answer_pings: true,
        };
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
    let t0 = Instant::now();
    let t0_ns = ns_since_origin(t0);
    shared.start.cancel();
    if let Some(started) = &opts.sending_started {
        started.cancel();
    }

    let mut progress = Progress::new(opts.progress);
    let mut last_delivered = 0;
    let mut last_progress = Instant::now();
    let ending = loop {
        tokio::time::sleep(POLL).await;
        let delivered = shared.delivered.load(Relaxed);
        let sent = shared.sent.load(Relaxed);
        if shared.finished.load(Relaxed) >= n {
            // Everyone is done, or gone: complete unless some ended early.
            break if delivered >= sent * n as u64 {
                Ending::Complete
            } else {
                Ending::Stalled
            };
        }
        let now = Instant::now();
        progress.tick("delivered", delivered, || {
            format!(", sent {sent} of {}", n as u64 * u64::from(m))
        });
        if delivered != last_delivered {
            last_delivered = delivered;
            last_progress = now;
        }
        if now.duration_since(t0) >= opts.duration {
            break Ending::TimeBound {
                stalled: now.duration_since(last_progress) >= opts.drain,
            };
        }
        // A stall ends a fanout early; in `slow` a stall is what is being
        // measured (a server may recover when it drops the slow client), so
        // there only the time bound ends the run.
        if !with_slow && now.duration_since(last_progress) >= opts.drain {
            break Ending::Stalled;
        }
    };
    let gave_up_ns = now_ns();
    let measured = meter.finish(&mut report.notes);
    shared.stop.cancel();
    let merged = collect(handles).await;

    let end_ns = match ending {
        Ending::Complete => merged.last_delivery_ns,
        _ => gave_up_ns,
    };
    let elapsed = (end_ns.saturating_sub(t0_ns) as f64 / 1e9).max(1e-9);
    // n clients send m each: the messages planned equal one receiver's `expect`.
    fill_deliveries(&mut report, &merged, n, expect, elapsed, None, ending);
    report.complete = ending == Ending::Complete;
    report.server = measured.usage(Some(merged.counts.delivered));
    report.tool_cpu_s = measured.tool_cpu_s;
    connection_notes(&merged, &mut report.notes);
    ending_note(&mut report, ending, opts, expect * n as u64);
    Ok(Exchanged {
        report,
        watched_left_ns: merged.watched_left_ns,
        t0_ns,
    })
}

#[cfg(test)]
mod tests {
    use chat_server::harness::TestServer;
    use chat_server::Config;

    use super::super::test_support::{assert_complete, small, small_broker};
    use super::super::{run, Scenario};
    use crate::protocol::Protocol;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_fanout_loses_nothing() {
        let server = TestServer::start(Config::default()).unwrap();
        let mut opts = small(Scenario::Fanout, &server);
        opts.messages = 50;
        let report = run(Scenario::Fanout, &opts).await.unwrap();
        assert_complete(&report, (150, 450, 0, 0));
        assert_eq!(report.latency_us.as_ref().unwrap().samples, 450);
        assert!(report.notes.is_empty(), "{:?}", report.notes);
    }

    /// The same accounting over a broker's pub/sub: everyone, the sender
    /// included, receives every publication once and in order.
    async fn fanout_over(protocol: Protocol) {
        let Some((mut opts, _broker)) = small_broker(Scenario::Fanout, protocol) else {
            return;
        };
        opts.messages = 50;
        let report = run(Scenario::Fanout, &opts).await.unwrap();
        assert_complete(&report, (150, 450, 0, 0));
        assert_eq!(report.latency_us.as_ref().unwrap().samples, 450);
        assert!(report.notes.is_empty(), "{:?}", report.notes);
    }

    /// The chat through its WebSocket door: the same room, the same counts.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_fanout_over_websocket_loses_nothing() {
        let server = TestServer::start(Config::default().with(|c| {
            c.web_addr = Some("127.0.0.1:0".into());
            c.names = true;
        }))
        .unwrap();
        let mut opts = small(Scenario::Fanout, &server);
        opts.addr = server.web_addr().unwrap();
        opts.nodes = vec![opts.addr];
        opts.protocol = Protocol::Ws;
        opts.messages = 50;
        let report = run(Scenario::Fanout, &opts).await.unwrap();
        assert_complete(&report, (150, 450, 0, 0));
        assert!(report.notes.is_empty(), "{:?}", report.notes);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_fanout_over_nats_loses_nothing() {
        fanout_over(Protocol::Nats).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_fanout_over_redis_loses_nothing() {
        fanout_over(Protocol::Redis).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn broker_protocols_refuse_scenarios_that_need_announcements() {
        let server = TestServer::start(Config::default()).unwrap();
        let mut opts = small(Scenario::Churn, &server);
        opts.protocol = Protocol::Nats;
        let err = run(Scenario::Churn, &opts).await.unwrap_err().to_string();
        assert!(err.contains("fanout and rate"), "{err}");
    }
}
