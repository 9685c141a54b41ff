use dynamite::storage::{self, StorageConfig, Tree, WriteOp};
use std::time::{Duration, Instant};
fn main() {
    let _ = std::fs::remove_dir_all("/tmp/fjb/d");
    let engine = storage::open(&StorageConfig::Durable {
        dir: "/tmp/fjb/d".into(),
    })
    .unwrap();
    let e2 = engine.clone();
    std::thread::spawn(move || {
        loop {
            std::thread::sleep(Duration::from_secs(1));
            e2.sync().unwrap();
        }
    });
    let mut rng = 12345u64;
    let mut hist = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    let mut ghist = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    let start = Instant::now();
    let mut n = 0u64;
    let value = vec![b'x'; 220];
    while start.elapsed() < Duration::from_secs(10) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let key = format!("key-{:06}", rng % 100_000).into_bytes();
        let t = Instant::now();
        let _ = engine.get(Tree::Data, &key).unwrap();
        ghist.record(t.elapsed().as_micros() as u64).unwrap();
        let t = Instant::now();
        engine
            .write(vec![WriteOp {
                tree: Tree::Data,
                key,
                value: Some(value.clone()),
            }])
            .unwrap();
        let us = t.elapsed().as_micros() as u64;
        hist.record(us).unwrap();
        if us > 2000 {
            println!("{:.3}s slow write {} us", start.elapsed().as_secs_f64(), us);
        }
        n += 1;
    }
    println!(
        "{} writes/s; write p50 {} p99 {} p999 {} max {} us; get p99 {} max {}",
        n / 10,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max(),
        ghist.value_at_quantile(0.99),
        ghist.max()
    );
}
