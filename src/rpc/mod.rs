//! XML-RPC over HTTP: the server both daemons run, the pooled client the balancer uses to reach
//! storage nodes, the codec between bodies and values, and the internal messages nodes and
//! balancers exchange.

pub mod batch;
pub mod client;
pub mod codec;
pub mod messages;
pub mod params;
mod plain_call;
pub mod server;
