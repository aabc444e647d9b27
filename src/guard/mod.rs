//! The guards that keep one client from hurting the others, each a policy
//! the session or the accept loop applies:
//!
//! - [`flood`]: each connection's input budget (`--flood-lines`,
//!   `--flood-bytes`);
//! - [`password`]: the room password's check and its per-address throttle
//!   (`--password-file`);
//! - [`limits`]: what the accept loop enforces across connections: TCP
//!   keepalive against vanished peers (`--keepalive`) and the clients'
//!   memory budget (`--max-client-memory`).
//!
//! The per-address connection count (`--max-clients-per-ip`) is in
//! [`crate::client::admission`]: it is a place the client holds while it is
//! served, given back when the last handle to the client goes.

pub(crate) mod flood;
pub(crate) mod limits;
pub(crate) mod password;
