//! Load client for `tests/bench/local`: N MQTT 3.1.1 publishers over plain TCP, each publishing
//! QoS 1 and waiting for its PUBACK before the next (closed loop), for S seconds. Prints one JSON
//! line: messages, rate, p50/p99/max PUBACK latency. The same client runs against gatewayd and
//! against mosquitto, so the client's own cost is the same on both sides.
//!   local_bench --port P --publishers N --secs S [--payload B] [--creds FILE] [--idle N]
//!               [--rate R]
//! `--rate R`: paced instead of closed loop: R messages per second in all, spread evenly over
//! the publishers; latency is counted from each message's scheduled send time, so a broker that
//! falls behind is charged for the wait (no coordinated omission).
//! `--creds FILE`: lines `client_id password` (gatewayd children); without it, anonymous clients
//! `bench-<i>`. `--idle N`: connect N clients, print `connected`, hold them until stdin closes.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn with_len(h: u8, body: Vec<u8>) -> Vec<u8> {
    let mut out = vec![h];
    gatewayd::local::codec::put_len(&mut out, body.len());
    out.extend(body);
    out
}

async fn connect(port: u16, id: &str, pass: Option<&str>) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.set_nodelay(true)?;
    let mut body = Vec::new();
    string(&mut body, b"MQTT");
    let flags = if pass.is_some() { 0xC2 } else { 0x02 };
    body.extend_from_slice(&[4, flags, 0, 60]);
    string(&mut body, id.as_bytes());
    if let Some(p) = pass {
        string(&mut body, id.as_bytes());
        string(&mut body, p.as_bytes());
    }
    s.write_all(&with_len(0x10, body)).await?;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await?;
    if ack[3] != 0 {
        return Err(std::io::Error::other(format!("{id}: CONNACK {}", ack[3])));
    }
    Ok(s)
}

async fn publisher(
    port: u16,
    id: String,
    pass: Option<String>,
    payload: usize,
    until: Instant,
    interval: Option<Duration>,
) -> std::io::Result<Vec<Duration>> {
    let mut s = connect(port, &id, pass.as_deref()).await?;
    let topic = format!("dt/{id}/bench");
    let mut lat = Vec::new();
    let mut pkid: u16 = 0;
    let mut ack = [0u8; 4];
    let mut next = Instant::now();
    while Instant::now() < until {
        pkid = pkid.wrapping_add(1).max(1);
        let mut body = Vec::new();
        string(&mut body, topic.as_bytes());
        body.extend_from_slice(&pkid.to_be_bytes());
        body.resize(body.len() + payload, b'x');
        let t = match interval {
            Some(i) => {
                tokio::time::sleep_until(next.into()).await;
                let t = next;
                next += i;
                t
            }
            None => Instant::now(),
        };
        s.write_all(&with_len(0x32, body)).await?;
        s.read_exact(&mut ack).await?;
        if ack[0] != 0x40 || u16::from_be_bytes([ack[2], ack[3]]) != pkid {
            return Err(std::io::Error::other(format!("{id}: unexpected {ack:?}")));
        }
        lat.push(t.elapsed());
    }
    let _ = s.write_all(&[0xE0, 0]).await;
    Ok(lat)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let port: u16 = arg("--port").ok_or("--port")?.parse()?;
    let n: usize = arg("--publishers").unwrap_or_else(|| "1".into()).parse()?;
    let secs: f64 = arg("--secs").unwrap_or_else(|| "3".into()).parse()?;
    let payload: usize = arg("--payload").unwrap_or_else(|| "200".into()).parse()?;
    let creds: Vec<(String, Option<String>)> = match arg("--creds") {
        Some(f) => std::fs::read_to_string(f)?
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(a, b)| (a.to_owned(), Some(b.to_owned())))
            .collect(),
        None => (0..1000).map(|i| (format!("bench-{i}"), None)).collect(),
    };
    if let Some(idle) = arg("--idle") {
        let idle: usize = idle.parse()?;
        let mut held = Vec::new();
        for (id, pass) in creds.iter().take(idle) {
            held.push(connect(port, id, pass.as_deref()).await?);
        }
        println!("connected {}", held.len());
        let mut sink = String::new();
        let _ = tokio::io::AsyncBufReadExt::read_line(
            &mut tokio::io::BufReader::new(tokio::io::stdin()),
            &mut sink,
        )
        .await;
        return Ok(());
    }
    let interval = match arg("--rate") {
        Some(r) => Some(Duration::from_secs_f64(n as f64 / r.parse::<f64>()?)),
        None => None,
    };
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let tasks: Vec<_> = creds
        .iter()
        .take(n)
        .cloned()
        .map(|(id, pass)| tokio::spawn(publisher(port, id, pass, payload, until, interval)))
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort();
    let q = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "{{\"publishers\":{n},\"msgs\":{},\"rate\":{:.0},\"p50_ms\":{:.2},\"p99_ms\":{:.2},\"max_ms\":{:.2}}}",
        lat.len(),
        lat.len() as f64 / elapsed,
        q(0.5),
        q(0.99),
        q(1.0)
    );
    Ok(())
}
