//! Prints every live entry of an outbox directory, one per line: `seq<TAB>child<TAB>topic<TAB>
//! payload` (payload as UTF-8, lossy). Used by `tests/slow/local-crash` to compare what devices
//! were PUBACKed with what a restarted gateway holds. Opens the outbox like the daemon does, so
//! the daemon must not be running on it.
//!   outbox_dump DIR

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: outbox_dump DIR")?;
    let ob = gatewayd::outbox::Outbox::open(dir, Default::default()).await?;
    loop {
        let batch = ob.take(10_000).await?;
        if batch.is_empty() {
            break;
        }
        for e in batch {
            println!(
                "{}\t{}\t{}\t{}",
                e.seq,
                e.child_id,
                e.topic,
                String::from_utf8_lossy(&e.payload)
            );
        }
    }
    ob.close().await?;
    Ok(())
}
