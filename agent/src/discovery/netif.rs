//! Which network interface holds the agent's advertised address (what `NCCL_SOCKET_IFNAME`
//! should name on this host).

use std::net::IpAddr;

use super::rdma::netdev_name;

/// The interface among `interfaces` (name, address) that holds `address`; the first by name when
/// several do. An address label such as `eth0:1` (an IPv4 alias) names its interface, `eth0`. A
/// loopback address no interface holds exactly (127.0.0.2) belongs to the interface holding
/// loopback addresses of its family. `None` for the unspecified address, or when no interface
/// holds it.
pub fn interface_holding(address: IpAddr, interfaces: &[(String, IpAddr)]) -> Option<String> {
    let address = canonical(address);
    if address.is_unspecified() {
        return None;
    }
    let holders = |matches: &dyn Fn(IpAddr) -> bool| {
        let mut names: Vec<String> = interfaces
            .iter()
            .filter(|(_, a)| matches(canonical(*a)))
            .filter_map(|(name, _)| netdev_name(name.split(':').next().unwrap_or_default()))
            .collect();
        names.sort();
        names.into_iter().next()
    };
    holders(&|a| a == address).or_else(|| {
        // The loopback interface answers for all of 127.0.0.0/8 while holding 127.0.0.1 only
        // (`trainctl dev` puts its agents on 127.0.0.2, ...).
        if address.is_loopback() {
            holders(&|a| a.is_loopback() && a.is_ipv4() == address.is_ipv4())
        } else {
            None
        }
    })
}

/// An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`) as the IPv4 address it maps.
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// This host's interface holding `address` ([`interface_holding`] over the interfaces the
/// kernel lists); empty when none does or the list cannot be read.
pub fn advertised_interface(address: IpAddr) -> String {
    let networks = match sysinfo::Networks::new_with_refreshed_list() {
        Ok(networks) => networks,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list network interfaces; the advertised interface is unknown");
            return String::new();
        }
    };
    let interfaces: Vec<(String, IpAddr)> = networks
        .iter()
        .flat_map(|(name, data)| {
            let name = name.to_string_lossy().into_owned();
            data.ip_networks()
                .iter()
                .map(move |n| (name.clone(), n.addr))
        })
        .collect();
    match interface_holding(address, &interfaces) {
        Some(name) => name,
        None => {
            tracing::info!(%address, "no network interface holds the advertised address (NAT or a proxy in front?); NCCL_SOCKET_IFNAME will not be derived from it");
            String::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ifs(list: &[(&str, &str)]) -> Vec<(String, IpAddr)> {
        list.iter()
            .map(|(n, a)| (n.to_string(), a.parse().unwrap()))
            .collect()
    }

    #[test]
    fn the_interface_holding_the_address_is_found() {
        let host = ifs(&[
            ("lo", "127.0.0.1"),
            ("lo", "::1"),
            ("eth0", "10.0.0.5"),
            ("eth0", "fe80::1"),
            ("ib0", "192.168.10.5"),
            ("eth0:1", "10.0.1.5"),
            ("vip1", "10.9.9.9"),
            ("vip0", "10.9.9.9"),
            ("bad/name", "10.7.7.7"),
        ]);
        let cases = [
            ("10.0.0.5", Some("eth0")),
            ("192.168.10.5", Some("ib0")),
            ("127.0.0.1", Some("lo")),
            ("127.0.0.2", Some("lo")),
            ("::1", Some("lo")),
            ("::ffff:10.0.0.5", Some("eth0")),
            ("10.0.1.5", Some("eth0")),
            ("10.9.9.9", Some("vip0")),
            ("10.7.7.7", None),
            ("10.0.0.6", None),
            ("0.0.0.0", None),
            ("::", None),
        ];
        for (address, want) in cases {
            assert_eq!(
                interface_holding(address.parse().unwrap(), &host).as_deref(),
                want,
                "{address}"
            );
        }
    }

    #[test]
    fn loopback_is_found_on_this_host() {
        // Every Linux host has lo with 127.0.0.1 (also in containers).
        assert_eq!(advertised_interface("127.0.0.1".parse().unwrap()), "lo");
        assert_eq!(advertised_interface("127.0.0.3".parse().unwrap()), "lo");
        assert_eq!(advertised_interface("203.0.113.77".parse().unwrap()), "");
    }
}
