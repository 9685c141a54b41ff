//! Correctness under load: 64 clients at once, each on its own keep-alive connection, for a
//! bounded number of operations. Speed is the benchmark's business (examples/bench.sh); this
//! checks that concurrency loses nothing and invents nothing.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use common::*;

const CLIENTS: usize = 64;
const OPERATIONS_PER_CLIENT: usize = 40;
/// Keys every client writes and reads, so that puts and gets collide all the time.
const HOT_KEYS: usize = 16;

fn hot_key(i: usize) -> String {
    format!("hot-{:02}", i % HOT_KEYS)
}

#[test]
fn sixty_four_clients_lose_nothing_and_read_only_what_was_written() {
    let cluster = Cluster::builder().start();
    let port = cluster.balancer_port(0);
    // Every value any client tried to put under each hot key, acknowledged or not yet: a read
    // may see any of them (or nil before the first put lands), and nothing else.
    let attempted: Arc<Mutex<BTreeMap<String, BTreeSet<String>>>> = Arc::default();

    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let attempted = attempted.clone();
            std::thread::spawn(move || {
                let rpc = Rpc::new(port);
                let mut own_acknowledged = Vec::new();
                let mut reads = Vec::new();
                for op in 0..OPERATIONS_PER_CLIENT {
                    let hot = hot_key(client + op);
                    match op % 4 {
                        0 => {
                            // A key only this client writes: it must survive exactly.
                            let key = format!("own-{client:02}-{op:03}");
                            let value = format!("{client}/{op}");
                            assert_eq!(rpc.put(&key, s(&value)), ok200(), "put {key}");
                            own_acknowledged.push((key, value));
                        }
                        1 => {
                            let value = format!("{client}/{op}");
                            attempted
                                .lock()
                                .expect("lock")
                                .entry(hot.clone())
                                .or_default()
                                .insert(value.clone());
                            assert_eq!(rpc.put(&hot, s(&value)), ok200(), "put {hot}");
                        }
                        _ => reads.push((hot.clone(), rpc.get(&hot).expect("get under load"))),
                    }
                }
                (own_acknowledged, reads)
            })
        })
        .collect();

    let mut acknowledged = Vec::new();
    let mut reads = Vec::new();
    for client in clients {
        let (own, seen) = client.join().expect("a client thread panicked");
        acknowledged.extend(own);
        reads.extend(seen);
    }

    let attempted = attempted.lock().expect("lock");
    for (key, value) in &reads {
        match value {
            Value::Nil => {}
            Value::String(text) => assert!(
                attempted
                    .get(key)
                    .is_some_and(|values| values.contains(text)),
                "get({key}) returned {text:?}, which no client ever put"
            ),
            other => panic!("get({key}) returned {other:?}, which no client ever put"),
        }
    }

    // Afterwards: every acknowledged write is there, through a fresh connection.
    let rpc = cluster.client();
    assert_eq!(acknowledged.len(), CLIENTS * OPERATIONS_PER_CLIENT / 4);
    for (key, value) in &acknowledged {
        assert_eq!(
            rpc.get(key),
            Ok(s(value)),
            "acknowledged {key} is missing or wrong"
        );
    }
    for key in attempted.keys() {
        let Value::String(last) = rpc.get(key).expect("final get") else {
            panic!("hot key {key} lost every write");
        };
        assert!(
            attempted[key].contains(&last),
            "{key} holds {last:?}, which no client put"
        );
    }
}
