//! Fan-out cost in the hub: one message to N local subscriber outboxes (frame built once,
//! a refcounted clone pushed into each bounded queue). Run with `cargo bench -p gateway`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gateway::hub::Hub;
use gateway::metrics::Metrics;
use gateway::outbox::Outbox;

fn fanout(c: &mut Criterion) {
    let payload = br#"{"seq":1,"t":1700000000000000,"p":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;
    let mut group = c.benchmark_group("hub_publish");
    for subscribers in [1_000usize, 10_000] {
        let hub = Hub::new(Metrics::new());
        let outboxes: Vec<Arc<Outbox>> = (0..subscribers)
            .map(|i| {
                let outbox = Arc::new(Outbox::new(1 << 20));
                hub.subscribe(&"bench".into(), i as u64, &outbox);
                outbox
            })
            .collect();
        let mut batch = VecDeque::new();
        group.throughput(Throughput::Elements(subscribers as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(subscribers),
            &subscribers,
            |b, _| {
                b.iter_custom(|iters| {
                    let mut spent = std::time::Duration::ZERO;
                    for i in 0..iters {
                        let start = Instant::now();
                        hub.publish("bench", payload, None, start);
                        spent += start.elapsed();
                        // Drain like the writers would, outside the timed section, so queues
                        // never overflow.
                        if i % 64 == 63 {
                            for outbox in &outboxes {
                                outbox.take(&mut batch);
                                batch.clear();
                            }
                        }
                    }
                    for outbox in &outboxes {
                        outbox.take(&mut batch);
                        batch.clear();
                    }
                    spent
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
