//! The transport: XML-RPC over HTTP, the server both daemons run, the pooled client they use
//! to reach each other, the codec between bodies and values, and the internal messages nodes
//! and balancers exchange (with the binary batch they travel in); [`transport`] is where
//! connections come from (TCP, or a simulation's network). Nothing here decides anything
//! about replicas or quorums.

pub mod batch;
pub mod client;
pub mod codec;
pub mod messages;
pub mod params;
mod plain_call;
pub mod server;
#[cfg(test)]
pub(crate) mod test_node;
pub mod transport;
