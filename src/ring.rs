//! The consistent-hash ring: which storage nodes hold a key.
//!
//! Dynamo (DeCandia et al., SOSP 2007, §4.2) partitions keys with consistent hashing. The
//! output range of a hash function is treated as a circle; every server is given positions
//! on it, and a key is hashed onto the same circle. Walking clockwise from the key, the first
//! server met is the key's coordinator, and the first N *distinct* servers form its
//! *preference list*: the replicas that hold it. Servers further along the walk are the
//! fallbacks that take writes, with a hint, while a replica is down (sloppy quorum, §4.6).
//!
//! Why a ring rather than `hash(key) % servers`: with a modulus, adding or removing one
//! server changes the home of almost every key, and each change means moving data. On the
//! ring a server only owns the arcs that end at its positions, so when a server joins it
//! takes over keys only from the arcs it splits, about `1/servers` of them, and when it
//! leaves only its own keys move to their next server clockwise.
//!
//! Why virtual nodes: a single random position per server makes arcs wildly unequal (with
//! five servers, one commonly owns two or three times the share of another), and when a
//! server fails its whole load falls on the one neighbour clockwise. Placing each server at
//! many positions averages the arc lengths out, so the load is even, and the keys of a failed
//! server spread over all the others. The count is [`DEFAULT_VNODES`] unless `--vnodes`
//! says otherwise.
//!
//! Why placement depends only on the *set* of servers: several balancers run side by side
//! over the same storage nodes, and a value put through one must be found through another.
//! Each balancer builds its own ring from its command line, so the ring must not depend on
//! the order of the `--server` flags or on a server listed twice. Servers are therefore
//! sorted and deduplicated before anything is placed, ties between equal positions are broken
//! by that sorted index, and the hash is MD5, which is the same on every machine and every
//! build. [`Ring::fingerprint`] summarises all of this so that daemons can notice when they
//! were started with different ring parameters.
//!
//! The ring is pure data: building it and looking keys up do no I/O, so every property of the
//! placement is checked by the unit tests below.

/// Positions per server when `--vnodes` is not given.
///
/// Fewer positions leave some arcs much longer than others, and the server owning them
/// takes a larger share of keys; more positions even the load out but cost memory (16 bytes
/// each) and start-up time (an MD5 per position, then a sort), both still small at 256: a
/// ring of 100 servers is 25 600 entries built in about 4 ms. Measured over 100 000 keys
/// (`key-{i}`) on five servers (`127.0.0.1:2000{i}`), busiest server / mean:
///
/// | vnodes | first replica | any of 3 replicas |
/// |---|---|---|
/// | 64 | 1.093 | 1.084 |
/// | 128 | 1.102 | 1.089 |
/// | **256** | **1.092** | **1.049** |
/// | 512 | 1.037 | 1.025 |
///
/// One set of servers can be lucky, so the choice also looked at other sets (3, 5, 7, 10 and
/// 20 servers with differently shaped addresses, 200 000 keys): the worst first-replica
/// ratio was 1.303 at 64, 1.163 at 128 and 1.119 at 256. 256 keeps every server within
/// about 12% of its fair share, well inside the 25% the tests allow, and is the token count
/// Cassandra long used by default for the same reason.
pub const DEFAULT_VNODES: usize = 256;

/// Names the placement scheme in the fingerprint, so that a future change of hash or of the
/// vnode naming is detected as a different ring even for the same servers and `vnodes`.
const HASH_SCHEME: &str = "md5-be64:{server}#{i}";

/// A consistent-hash ring over a fixed set of servers.
#[derive(Debug, Clone)]
pub struct Ring {
    /// The distinct server addresses, sorted; every server index refers to this list.
    servers: Vec<String>,
    /// Positions per server.
    vnodes: usize,
    /// Every virtual node as (position, server index), sorted by position and then by index,
    /// so that a lookup is a binary search and equal positions resolve the same way everywhere.
    points: Vec<(u64, usize)>,
}

impl Ring {
    /// Builds the ring from server addresses (`host:port` strings).
    ///
    /// The input is sorted and deduplicated first, so that every balancer given the same set
    /// of servers builds the same ring, whatever the order or repetition on its command line.
    /// An empty list gives an empty ring, on which every lookup yields no server.
    ///
    /// # Panics
    ///
    /// If `vnodes` is 0: a server without a position would own no keys, which is never what
    /// the caller meant. Configuration validation refuses it before a ring is built.
    pub fn new<S: AsRef<str>>(servers: &[S], vnodes: usize) -> Ring {
        assert!(vnodes >= 1, "a ring needs at least one vnode per server");
        let mut servers: Vec<String> = servers.iter().map(|s| s.as_ref().to_owned()).collect();
        servers.sort_unstable();
        servers.dedup();

        let mut points = Vec::with_capacity(servers.len() * vnodes);
        // One buffer for all the "{server}#{i}" names rather than an allocation per vnode.
        let mut name = String::new();
        for (index, server) in servers.iter().enumerate() {
            for i in 0..vnodes {
                name.clear();
                name.push_str(server);
                name.push('#');
                name.push_str(&i.to_string());
                points.push((Self::key_position(name.as_bytes()), index));
            }
        }
        points.sort_unstable();

        Ring {
            servers,
            vnodes,
            points,
        }
    }

    /// The distinct servers, sorted; indexes returned by the other methods point into this
    /// slice, so callers can keep per-server state (connections, health) in a parallel `Vec`.
    pub fn servers(&self) -> &[String] {
        &self.servers
    }

    /// Positions per server, as given to [`Ring::new`].
    pub fn vnodes(&self) -> usize {
        self.vnodes
    }

    /// Position of a key on the ring: the first 8 bytes of MD5(key) as a big-endian u64.
    ///
    /// MD5 is not used for security here, only because it is fast, spreads keys uniformly and
    /// gives the same answer on every platform, which placement across balancers depends on.
    pub fn key_position(key: &[u8]) -> u64 {
        let digest = md5::compute(key).0;
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_be_bytes(first)
    }

    /// The key's replicas: the first `n` distinct servers clockwise from its position (fewer
    /// if the ring has fewer servers), coordinator first.
    ///
    /// Always a prefix of [`Ring::walk`], so the fallbacks a sloppy quorum reaches for are
    /// exactly the servers that come after the preference list.
    pub fn preference_list(&self, key: &[u8], n: usize) -> Vec<usize> {
        self.walk(key).take(n).collect()
    }

    /// Every distinct server once, in clockwise order from the key's position: the preference
    /// list followed by the fallbacks used for sloppy quorum.
    ///
    /// Lazy, so a coordinator that finds its first replicas healthy stops early; it
    /// allocates one flag per server up front and nothing per step, and it stops as soon as
    /// every server has been seen rather than running through all the vnodes.
    pub fn walk(&self, key: &[u8]) -> impl Iterator<Item = usize> + '_ {
        self.walk_from(Self::key_position(key))
    }

    /// The walk starting from a raw ring position, so tests can aim at exact positions such
    /// as the wrap-around past the last vnode.
    fn walk_from(&self, position: u64) -> Walk<'_> {
        // The first vnode at or after the position; if there is none the walk wraps to 0.
        let start = self.points.partition_point(|&(p, _)| p < position);
        let start = if start == self.points.len() { 0 } else { start };
        Walk {
            points: &self.points,
            next: start,
            steps_left: self.points.len(),
            seen: vec![false; self.servers.len()],
            unseen: self.servers.len(),
        }
    }

    /// What two daemons that work on the same keys compare before they do: the ring's
    /// [`Self::fingerprint`] and N (nodes with `-s` peers show it in `stats()`, and a
    /// balancer leaves out a node whose fingerprint differs).
    pub fn fingerprint_with_replicas(&self, replicas: usize) -> String {
        format!("{}/N{replicas}", self.fingerprint())
    }

    /// A short hex string identifying (sorted servers, vnodes, hash scheme).
    ///
    /// Two balancers with different fingerprints route keys differently, so a value put
    /// through one may be missed through the other; daemons compare fingerprints to report
    /// that misconfiguration instead of silently losing reads.
    pub fn fingerprint(&self) -> String {
        // Length prefixes keep the encoding unambiguous whatever characters the addresses hold.
        let mut input = Vec::new();
        for field in [HASH_SCHEME, &self.vnodes.to_string()] {
            input.extend_from_slice(&field.len().to_be_bytes());
            input.extend_from_slice(field.as_bytes());
        }
        for server in &self.servers {
            input.extend_from_slice(&server.len().to_be_bytes());
            input.extend_from_slice(server.as_bytes());
        }
        let digest = md5::compute(&input).0;
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The iterator behind [`Ring::walk`].
struct Walk<'a> {
    /// The ring's vnodes, sorted by position.
    points: &'a [(u64, usize)],
    /// Index in `points` of the next vnode to look at.
    next: usize,
    /// Vnodes not yet looked at; bounds the walk to one turn of the ring.
    steps_left: usize,
    /// Which servers have been yielded already.
    seen: Vec<bool>,
    /// How many servers have not been yielded yet; the walk ends when it reaches 0.
    unseen: usize,
}

impl Iterator for Walk<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        while self.unseen > 0 && self.steps_left > 0 {
            let (_, server) = self.points[self.next];
            self.next = if self.next + 1 == self.points.len() {
                0
            } else {
                self.next + 1
            };
            self.steps_left -= 1;
            if !self.seen[server] {
                self.seen[server] = true;
                self.unseen -= 1;
                return Some(server);
            }
        }
        None
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        // Every server has at least one vnode, so one turn meets all that are left.
        (self.unseen, Some(self.unseen))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn five_servers() -> Vec<String> {
        (0..5).map(|i| format!("127.0.0.1:2000{i}")).collect()
    }

    fn keys(count: usize) -> impl Iterator<Item = String> {
        (0..count).map(|i| format!("key-{i}"))
    }

    /// The first replica computed without the ring's sorted table or binary search: every
    /// vnode position is recomputed from the server names, and the owner is the smallest
    /// (position, index) at or after the key, or else the smallest overall (wrap-around).
    fn brute_force_owner(servers: &[String], vnodes: usize, position: u64) -> usize {
        let mut sorted: Vec<&String> = servers.iter().collect();
        sorted.sort();
        sorted.dedup();
        let all = sorted.iter().enumerate().flat_map(|(index, server)| {
            (0..vnodes).map(move |i| {
                let p = Ring::key_position(format!("{server}#{i}").as_bytes());
                (p, index)
            })
        });
        let after = all.clone().filter(|&(p, _)| p >= position).min();
        after.or_else(|| all.min()).expect("ring is not empty").1
    }

    #[test]
    fn key_position_is_first_eight_md5_bytes_big_endian() {
        // MD5("") = d41d8cd98f00b204e9800998ecf8427e, MD5("a") = 0cc175b9c0f1b6a831c399e269772661.
        let cases: &[(&[u8], u64)] = &[(b"", 0xd41d_8cd9_8f00_b204), (b"a", 0x0cc1_75b9_c0f1_b6a8)];
        for &(key, want) in cases {
            assert_eq!(Ring::key_position(key), want, "key {key:?}");
        }
    }

    #[test]
    fn placement_depends_only_on_the_set_of_servers() {
        let sorted = five_servers();
        let mut reversed = sorted.clone();
        reversed.reverse();
        let mut shuffled = sorted.clone();
        shuffled.swap(0, 3);
        shuffled.swap(1, 4);
        let mut duplicated = shuffled.clone();
        duplicated.extend(sorted.iter().take(3).cloned());
        duplicated.push(sorted[4].clone());

        let reference = Ring::new(&sorted, DEFAULT_VNODES);
        let cases = [
            ("reversed", &reversed),
            ("shuffled", &shuffled),
            ("duplicated", &duplicated),
        ];
        for (name, servers) in cases {
            let ring = Ring::new(servers, DEFAULT_VNODES);
            assert_eq!(ring.servers(), reference.servers(), "{name}");
            for key in keys(10_000) {
                assert_eq!(
                    ring.preference_list(key.as_bytes(), 5),
                    reference.preference_list(key.as_bytes(), 5),
                    "{name}: {key}"
                );
            }
        }
    }

    #[test]
    fn servers_are_sorted_and_distinct() {
        let ring = Ring::new(&["b:1", "a:1", "b:1", "c:1", "a:1"], 4);
        assert_eq!(ring.servers(), ["a:1", "b:1", "c:1"]);
        assert_eq!(ring.vnodes(), 4);
    }

    #[test]
    fn preference_list_has_n_distinct_servers_capped_at_server_count() {
        let ring = Ring::new(&five_servers(), DEFAULT_VNODES);
        // (n, expected length)
        let cases = [
            (0, 0),
            (1, 1),
            (3, 3),
            (5, 5),
            (6, 5),
            (1000, 5),
            (usize::MAX, 5),
        ];
        for (n, want) in cases {
            for key in keys(1_000) {
                let list = ring.preference_list(key.as_bytes(), n);
                assert_eq!(list.len(), want, "n={n} key={key}");
                let distinct: HashSet<_> = list.iter().collect();
                assert_eq!(distinct.len(), list.len(), "n={n} key={key}: {list:?}");
            }
        }
    }

    #[test]
    fn preference_list_is_a_prefix_of_walk() {
        let ring = Ring::new(&five_servers(), DEFAULT_VNODES);
        for key in keys(1_000) {
            let walk: Vec<usize> = ring.walk(key.as_bytes()).collect();
            for n in 0..=6 {
                let list = ring.preference_list(key.as_bytes(), n);
                assert_eq!(list[..], walk[..list.len()], "n={n} key={key}");
            }
        }
    }

    #[test]
    fn walk_yields_every_server_exactly_once() {
        // (servers, vnodes)
        let cases: &[(&[&str], usize)] = &[
            (&[], 1),
            (&["only:1"], 1),
            (&["only:1"], 8),
            (&["a:1", "b:1"], 1),
            (&["a:1", "b:1", "c:1", "d:1", "e:1", "f:1", "g:1"], 3),
            (&["a:1", "b:1", "c:1", "d:1", "e:1"], DEFAULT_VNODES),
        ];
        for &(servers, vnodes) in cases {
            let ring = Ring::new(servers, vnodes);
            for key in keys(500) {
                let mut walk: Vec<usize> = ring.walk(key.as_bytes()).collect();
                walk.sort_unstable();
                let want: Vec<usize> = (0..servers.len()).collect();
                assert_eq!(walk, want, "servers={servers:?} vnodes={vnodes} key={key}");
            }
        }
    }

    #[test]
    fn first_replica_owns_the_first_vnode_clockwise() {
        // (servers, vnodes): few vnodes leave long arcs, including the wrap-around arc.
        let cases: Vec<(Vec<String>, usize)> = vec![
            (vec!["x:1".into()], 1),
            (vec!["a:1".into(), "b:1".into(), "c:1".into()], 1),
            (vec!["a:1".into(), "b:1".into(), "c:1".into()], 4),
            (five_servers(), 16),
            (five_servers(), DEFAULT_VNODES),
        ];
        for (servers, vnodes) in cases {
            let ring = Ring::new(&servers, vnodes);
            for key in keys(300) {
                let position = Ring::key_position(key.as_bytes());
                let want = brute_force_owner(&servers, vnodes, position);
                assert_eq!(
                    ring.preference_list(key.as_bytes(), 1),
                    [want],
                    "servers={servers:?} vnodes={vnodes} key={key}"
                );
            }
        }
    }

    #[test]
    fn positions_at_the_edges_of_arcs_and_past_the_last_vnode() {
        let servers = five_servers();
        let ring = Ring::new(&servers, 16);
        let first = ring.points[0];
        let last = ring.points[ring.points.len() - 1];
        let second = ring.points[1];
        // (what, position, expected first replica)
        let cases = [
            ("position 0", 0, first.1),
            ("exactly on the first vnode", first.0, first.1),
            ("just after the first vnode", first.0 + 1, second.1),
            ("exactly on the last vnode", last.0, last.1),
            ("past the last vnode wraps", last.0 + 1, first.1),
            ("u64::MAX wraps", u64::MAX, first.1),
        ];
        for (what, position, want) in cases {
            assert_eq!(ring.walk_from(position).next(), Some(want), "{what}");
            assert_eq!(
                brute_force_owner(&servers, 16, position),
                want,
                "brute force: {what}"
            );
        }

        // A real key whose position lies past the last vnode takes the wrap-around path too.
        let wrapping = (0..)
            .map(|i| format!("wrap-{i}"))
            .find(|k| Ring::key_position(k.as_bytes()) > last.0)
            .expect("some key hashes past the last vnode");
        assert_eq!(
            ring.preference_list(wrapping.as_bytes(), 1),
            [first.1],
            "{wrapping}"
        );
    }

    /// Busiest server's count divided by the mean count, for the first `replicas` replicas
    /// of 100 000 keys on the five test servers.
    fn load_ratio(vnodes: usize, replicas: usize) -> f64 {
        let ring = Ring::new(&five_servers(), vnodes);
        let mut counts = [0usize; 5];
        for key in keys(100_000) {
            for server in ring.walk(key.as_bytes()).take(replicas) {
                counts[server] += 1;
            }
        }
        let mean = (100_000 * replicas) as f64 / 5.0;
        let max = counts.iter().copied().max().unwrap_or(0) as f64;
        max / mean
    }

    #[test]
    fn default_vnodes_spread_keys_evenly() {
        // (replicas counted, largest busiest/mean ratio allowed)
        let cases = [(1, 1.25), (3, 1.25)];
        for (replicas, limit) in cases {
            let ratio = load_ratio(DEFAULT_VNODES, replicas);
            assert!(
                ratio <= limit,
                "{replicas} replica(s): busiest/mean = {ratio:.3} > {limit}"
            );
        }
    }

    /// Prints the figures quoted on [`DEFAULT_VNODES`]; run with `--ignored --nocapture`.
    #[test]
    #[ignore]
    fn measure_spread_for_several_vnode_counts() {
        for vnodes in [1, 16, 32, 64, 128, 256, 512] {
            println!(
                "vnodes {vnodes:4}: first replica {:.3}, any of 3 replicas {:.3}",
                load_ratio(vnodes, 1),
                load_ratio(vnodes, 3)
            );
        }
    }

    #[test]
    fn adding_a_server_moves_only_its_share_of_keys() {
        let before = Ring::new(&five_servers(), DEFAULT_VNODES);
        let mut six = five_servers();
        six.push("127.0.0.1:20005".into());
        let after = Ring::new(&six, DEFAULT_VNODES);
        let newcomer = after
            .servers()
            .iter()
            .position(|s| s == "127.0.0.1:20005")
            .expect("new server is on the ring");

        let total = 100_000;
        let mut moved = 0;
        for key in keys(total) {
            let old = before.servers()[before.preference_list(key.as_bytes(), 1)[0]].as_str();
            let new_index = after.preference_list(key.as_bytes(), 1)[0];
            if old != after.servers()[new_index] {
                moved += 1;
                // Keys only move to the newcomer, never between the old servers.
                assert_eq!(
                    new_index, newcomer,
                    "{key} moved from {old} to another old server"
                );
            }
        }
        let fraction = moved as f64 / total as f64;
        assert!(
            (0.10..=0.25).contains(&fraction),
            "{fraction:.3} of keys moved, expected about 1/6"
        );
    }

    #[test]
    fn fingerprint_identifies_the_set_vnodes_and_scheme() {
        let base = Ring::new(&["a:1", "b:1", "c:1"], 64).fingerprint();
        assert_eq!(base.len(), 16);
        assert!(base.chars().all(|c| c.is_ascii_hexdigit()), "{base}");

        // (what, servers, vnodes, same fingerprint as base?)
        let cases: &[(&str, &[&str], usize, bool)] = &[
            ("same order", &["a:1", "b:1", "c:1"], 64, true),
            ("other order", &["c:1", "a:1", "b:1"], 64, true),
            ("duplicates", &["b:1", "a:1", "c:1", "a:1"], 64, true),
            ("other vnodes", &["a:1", "b:1", "c:1"], 65, false),
            ("one server fewer", &["a:1", "b:1"], 64, false),
            ("one server more", &["a:1", "b:1", "c:1", "d:1"], 64, false),
            ("other port", &["a:1", "b:1", "c:2"], 64, false),
        ];
        for &(what, servers, vnodes, same) in cases {
            let fingerprint = Ring::new(servers, vnodes).fingerprint();
            assert_eq!(fingerprint == base, same, "{what}: {fingerprint} vs {base}");
        }
    }

    #[test]
    #[should_panic(expected = "at least one vnode")]
    fn zero_vnodes_is_refused() {
        let _ = Ring::new(&["a:1"], 0);
    }
}
