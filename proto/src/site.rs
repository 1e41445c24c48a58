//! Site peers: the TLS name an agent serving its site answers to.
//!
//! A node certificate names its node for serving peers as
//! `<node id>.node.flotilla.invalid`: `.invalid` is reserved (RFC 6761), so no
//! server's real host name can ever match it, and a node certificate can never
//! pass for a server's.

/// The DNS name suffix of node certificates, for serving site peers.
pub const SERVER_NAME_SUFFIX: &str = ".node.flotilla.invalid";

/// The name a site peer checks the serving agent's certificate against.
pub fn server_name(node_id: &str) -> String {
    format!("{node_id}{SERVER_NAME_SUFFIX}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_name_is_a_valid_dns_name_under_invalid() {
        let name = super::server_name("node-0123abcd");
        assert_eq!(name, "node-0123abcd.node.flotilla.invalid");
        assert!(rustls::pki_types::ServerName::try_from(name).is_ok());
    }
}
