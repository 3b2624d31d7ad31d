//! One line (a TCP host:port or a serial port): its connections, its pacing, and the wrapper
//! every Modbus call goes through.
//!
//! tokio-modbus 0.17 has no client timeouts, and after a timed-out request the connection is
//! out of step: the late answer is read as the answer to the next request (HeaderMismatch on
//! TCP, a wrong value on RTU, which has no transaction id; upstream issue #324). So
//! [`Conn::call`] bounds every request with a timeout and, after a timeout or a
//! transport/protocol error, drops the context: the next request reconnects (TCP) or reopens the
//! port (RTU). A Modbus exception leaves the connection in step and keeps it. RTU has no
//! transaction id, so a reopen alone does not help (the late bytes still arrive on the wire):
//! after a timeout an RTU line first stays quiet for `settle_after_timeout_ms`, then reopens the
//! port and flushes its input.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use gatewayd_plugin::{PluginError, PluginStats};
use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;
use tokio_modbus::client::{Client, Context};
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::{Request, Response, Slave};

use crate::config::{Parity, RtuLine};

/// Where a line's connections go.
#[derive(Debug, Clone, PartialEq)]
pub enum Endpoint {
    Tcp { host: String, port: u16 },
    Rtu(RtuLine),
}

impl Endpoint {
    /// The device-id prefix for units on this line.
    pub fn id_prefix(&self) -> String {
        match self {
            Self::Tcp { host, port } if host.contains(':') => {
                format!("modbus+tcp://[{host}]:{port}")
            }
            Self::Tcp { host, port } => format!("modbus+tcp://{host}:{port}"),
            Self::Rtu(r) => format!("modbus+rtu://{}", r.device),
        }
    }
}

#[derive(Debug, Default)]
pub struct Stats {
    requests: AtomicU64,
    timeouts: AtomicU64,
    reconnects: AtomicU64,
    connects: AtomicU64,
}

impl Stats {
    pub fn snapshot(&self) -> PluginStats {
        PluginStats {
            requests: self.requests.load(Ordering::Relaxed),
            timeouts: self.timeouts.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            connects: self.connects.load(Ordering::Relaxed),
        }
    }
}

/// One connection (or open port) and the rule that keeps it in step.
pub struct Conn {
    endpoint: Arc<Endpoint>,
    ctx: Option<Context>,
    timeout: Duration,
    stats: Arc<Stats>,
    /// Set once a context was dropped after a failure: the next open counts as a reconnect.
    dropped: bool,
}

impl Conn {
    pub fn new(endpoint: Arc<Endpoint>, timeout: Duration, stats: Arc<Stats>) -> Self {
        Self {
            endpoint,
            ctx: None,
            timeout,
            stats,
            dropped: false,
        }
    }
}

/// Connects (TCP) or opens the port (RTU). A free function: a `&Conn` held across an await would
/// make every caller's future non-`Send` (the context is not `Sync`).
async fn open(endpoint: &Endpoint, timeout: Duration) -> Result<Context, PluginError> {
    match endpoint {
        Endpoint::Tcp { host, port } => {
            let connect = async {
                let stream = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                stream.set_nodelay(true)?;
                Ok::<_, std::io::Error>(tokio_modbus::client::tcp::attach(stream))
            };
            match tokio::time::timeout(timeout, connect).await {
                Ok(Ok(ctx)) => Ok(ctx),
                Ok(Err(e)) => Err(PluginError::Transport(format!(
                    "connect {host}:{port}: {e}"
                ))),
                // No connection at all is a transport failure, not a slow device: a scan skips
                // the rest of this line instead of waiting this long for each of its units.
                Err(_) => Err(PluginError::Transport(format!(
                    "connect {host}:{port}: no answer within {} ms",
                    millis(timeout)
                ))),
            }
        }
        Endpoint::Rtu(line) => {
            use tokio_serial::{SerialPort, SerialPortBuilderExt};
            let port = tokio_serial::new(&line.device, line.baud)
                .parity(match line.parity {
                    Parity::None => tokio_serial::Parity::None,
                    Parity::Even => tokio_serial::Parity::Even,
                    Parity::Odd => tokio_serial::Parity::Odd,
                })
                .data_bits(match line.data_bits {
                    5 => tokio_serial::DataBits::Five,
                    6 => tokio_serial::DataBits::Six,
                    7 => tokio_serial::DataBits::Seven,
                    _ => tokio_serial::DataBits::Eight,
                })
                .stop_bits(if line.stop_bits == 2 {
                    tokio_serial::StopBits::Two
                } else {
                    tokio_serial::StopBits::One
                })
                .open_native_async()
                .map_err(|e| PluginError::Transport(format!("open {}: {e}", line.device)))?;
            // Bytes a late device sent before the reopen must not be read as the next answer.
            port.clear(tokio_serial::ClearBuffer::All)
                .map_err(|e| PluginError::Transport(format!("clear {}: {e}", line.device)))?;
            Ok(tokio_modbus::client::rtu::attach(port))
        }
    }
}

impl Conn {
    /// Sends one request to `unit` and waits at most the timeout for its answer.
    pub async fn call(
        &mut self,
        unit: u8,
        request: Request<'static>,
    ) -> Result<Response, PluginError> {
        let mut ctx = match self.ctx.take() {
            Some(ctx) => ctx,
            None => {
                if let (true, Endpoint::Rtu(line)) = (self.dropped, &*self.endpoint) {
                    // Let a late answer land before the reopen flushes it (see RtuLine).
                    tokio::time::sleep(Duration::from_millis(line.settle_after_timeout_ms)).await;
                }
                self.stats.connects.fetch_add(1, Ordering::Relaxed);
                let ctx = open(&self.endpoint, self.timeout).await?;
                if self.dropped {
                    self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    self.dropped = false;
                }
                ctx
            }
        };
        ctx.set_slave(Slave(unit));
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        // If this future is dropped mid-request, `ctx` is dropped with it: never reused out of step.
        let answer = tokio::time::timeout(self.timeout, ctx.call(request)).await;
        let result = match answer {
            Ok(Ok(Ok(response))) => Ok(response),
            Ok(Ok(Err(exception))) => Err(exception_error(exception)),
            Ok(Err(tokio_modbus::Error::Transport(e))) => {
                Err(PluginError::Transport(e.to_string()))
            }
            Ok(Err(tokio_modbus::Error::Protocol(e))) => Err(PluginError::Malformed(e.to_string())),
            Err(_) => {
                self.stats.timeouts.fetch_add(1, Ordering::Relaxed);
                Err(PluginError::Timeout {
                    after_ms: millis(self.timeout),
                })
            }
        };
        match &result {
            Ok(_) | Err(PluginError::Exception { .. }) => self.ctx = Some(ctx),
            // The connection may hold a late answer: drop it, reconnect before the next request.
            Err(_) => self.dropped = true,
        }
        result
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub fn exception_error(e: tokio_modbus::ExceptionCode) -> PluginError {
    let code = u8::from(e);
    PluginError::Exception {
        code,
        name: format!("{e:?}"),
    }
}

/// Paces requests on one line: at most `cap` in flight, request starts at least `delay` apart,
/// and a start at least `delay` after the latest answer (the bus rests between requests).
pub struct Pacer {
    permits: Semaphore,
    delay: Duration,
    next: std::sync::Mutex<Option<Instant>>,
}

/// Held for the length of one request.
pub struct Turn<'a> {
    _permit: SemaphorePermit<'a>,
    pacer: &'a Pacer,
}

impl Pacer {
    pub fn new(cap: usize, delay: Duration) -> Self {
        Self {
            permits: Semaphore::new(cap.max(1)),
            delay,
            next: std::sync::Mutex::new(None),
        }
    }

    pub async fn turn(&self) -> Turn<'_> {
        // The semaphore is never closed, so acquire cannot fail; a closed one would only end pacing.
        let permit = match self.permits.acquire().await {
            Ok(p) => p,
            Err(_) => std::future::pending().await,
        };
        let slot = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let slot = next.map_or(now, |n| n.max(now));
            *next = Some(slot + self.delay);
            slot
        };
        tokio::time::sleep_until(slot).await;
        Turn {
            _permit: permit,
            pacer: self,
        }
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut next = self.pacer.next.lock().unwrap_or_else(|e| e.into_inner());
        let rest = Instant::now() + self.pacer.delay;
        *next = Some(next.map_or(rest, |n| n.max(rest)));
    }
}

/// A line: endpoint, pacing, and a small pool of connections (one per concurrent request).
pub struct Line {
    pub endpoint: Arc<Endpoint>,
    pub units: Vec<u8>,
    pacer: Pacer,
    pool: std::sync::Mutex<Vec<Conn>>,
    timeout: Duration,
    stats: Arc<Stats>,
}

impl Line {
    pub fn new(
        endpoint: Endpoint,
        units: Vec<u8>,
        cap: usize,
        delay: Duration,
        timeout: Duration,
        stats: Arc<Stats>,
    ) -> Self {
        // RTU is one shared wire: strictly one request at a time.
        let cap = if matches!(endpoint, Endpoint::Rtu(_)) {
            1
        } else {
            cap
        };
        Self {
            endpoint: Arc::new(endpoint),
            units,
            pacer: Pacer::new(cap, delay),
            pool: std::sync::Mutex::new(Vec::new()),
            timeout,
            stats,
        }
    }

    pub async fn request(
        &self,
        unit: u8,
        request: Request<'static>,
    ) -> Result<Response, PluginError> {
        let _turn = self.pacer.turn().await;
        let conn = self.pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut conn = conn
            .unwrap_or_else(|| Conn::new(self.endpoint.clone(), self.timeout, self.stats.clone()));
        let result = conn.call(unit, request).await;
        self.pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Paused time: starts are `delay` apart and at most `cap` requests overlap.
    #[tokio::test(start_paused = true)]
    async fn pacer_spaces_starts_and_caps_concurrency() {
        let pacer = Arc::new(Pacer::new(2, Duration::from_millis(100)));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let starts = Arc::new(std::sync::Mutex::new(Vec::new()));
        let t0 = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..6 {
            let (pacer, in_flight, peak, starts) = (
                pacer.clone(),
                in_flight.clone(),
                peak.clone(),
                starts.clone(),
            );
            tasks.spawn(async move {
                let _turn = pacer.turn().await;
                starts.lock().expect("lock").push(t0.elapsed());
                let n = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(n, Ordering::SeqCst);
                // A request that takes longer than the delay.
                tokio::time::sleep(Duration::from_millis(250)).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
            });
        }
        while tasks.join_next().await.is_some() {}
        let mut starts = starts.lock().expect("lock").clone();
        starts.sort();
        assert_eq!(peak.load(Ordering::SeqCst), 2, "cap of 2 in flight");
        for w in starts.windows(2) {
            assert!(
                w[1] - w[0] >= Duration::from_millis(100),
                "starts too close: {starts:?}"
            );
        }
        // Third start waits for a permit (first ends at 250) and then the rest after it (350).
        assert!(starts[2] >= Duration::from_millis(350), "{starts:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn pacer_with_cap_one_rests_after_each_answer() {
        let pacer = Pacer::new(1, Duration::from_millis(50));
        let t0 = Instant::now();
        let mut starts = Vec::new();
        for _ in 0..3 {
            let _turn = pacer.turn().await;
            starts.push(t0.elapsed());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            starts,
            [
                Duration::ZERO,
                Duration::from_millis(60),
                Duration::from_millis(120)
            ]
        );
    }
}
