//! Where PCI devices sit: their sysfs paths, NUMA nodes, and how near two of them are.
//!
//! `/sys/bus/pci/devices/<bus id>` is a symlink to the device's place in the PCI tree, e.g.
//! `/sys/devices/pci0000:17/0000:17:00.0/0000:18:00.0/0000:19:01.0/0000:1b:00.0`: the host bridge
//! (`pci0000:17`), a root port, a PCIe switch's upstream and downstream ports, the device. From two
//! such paths and the devices' NUMA nodes, [`pcie_link`] names the link the way `nvidia-smi topo -m`
//! and NCCL do. Reading (`resolve`, `read_numa_node`) is apart from the pure decision.

use std::fs;
use std::path::{Path, PathBuf};

/// The PCIe path between two devices, nearest first (`Ord` sorts nearest first), in
/// `nvidia-smi topo`'s words. The coordinator's `PcieLink` has the same variants and words.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum PcieLink {
    /// Behind the same PCIe switch.
    #[serde(rename = "PIX")]
    Pix,
    /// Behind several PCIe switches, without crossing the host bridge.
    #[serde(rename = "PXB")]
    Pxb,
    /// Through the same PCIe host bridge.
    #[serde(rename = "PHB")]
    Phb,
    /// Through different host bridges of the same NUMA node.
    #[serde(rename = "NODE")]
    Node,
    /// Across NUMA nodes.
    #[serde(rename = "SYS")]
    Sys,
}

impl PcieLink {
    /// `nvidia-smi topo`'s word: "PIX", "PXB", "PHB", "NODE" or "SYS".
    pub fn as_str(self) -> &'static str {
        match self {
            PcieLink::Pix => "PIX",
            PcieLink::Pxb => "PXB",
            PcieLink::Phb => "PHB",
            PcieLink::Node => "NODE",
            PcieLink::Sys => "SYS",
        }
    }
}

/// A PCI device's place: its resolved sysfs path and NUMA node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciPlace {
    /// The resolved path, e.g. `/sys/devices/pci0000:17/0000:17:00.0/.../0000:1b:00.0`.
    pub path: PathBuf,
    /// The device's NUMA node; `None` when the kernel says -1 or the file is missing.
    pub numa_node: Option<u32>,
}

/// Whether `s` is a PCI bus id as sysfs names devices: `dddd:bb:dd.f`, lowercase hex, a
/// domain of 4 to 8 digits, device 00 to 1f, function 0 to 7.
pub fn is_pci_bus_id(s: &str) -> bool {
    let hex = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let Some((domain, rest)) = s.split_once(':') else {
        return false;
    };
    let Some((bus, rest)) = rest.split_once(':') else {
        return false;
    };
    let Some((device, function)) = rest.split_once('.') else {
        return false;
    };
    (4..=8).contains(&domain.len())
        && hex(domain)
        && bus.len() == 2
        && hex(bus)
        && device.len() == 2
        && hex(device)
        && u8::from_str_radix(device, 16).is_ok_and(|d| d <= 0x1f)
        && function.len() == 1
        && matches!(function.as_bytes()[0], b'0'..=b'7')
}

/// A NUMA node as sysfs writes it: "-1" (no node, or one node only) is `None`, as is anything
/// that is not a number.
pub fn parse_numa_node(raw: &str) -> Option<u32> {
    raw.trim().parse::<u32>().ok()
}

/// `<dir>/numa_node`, parsed ([`parse_numa_node`]).
pub fn read_numa_node(dir: &Path) -> Option<u32> {
    parse_numa_node(&fs::read_to_string(dir.join("numa_node")).ok()?)
}

/// Where the PCI device `bus_id` sits: `<sysfs_root>/bus/pci/devices/<bus_id>` resolved, and its
/// NUMA node. `None` when the device is not there (or `bus_id` is not a bus id).
pub fn resolve(sysfs_root: &Path, bus_id: &str) -> Option<PciPlace> {
    if !is_pci_bus_id(bus_id) {
        return None;
    }
    let link = sysfs_root.join("bus/pci/devices").join(bus_id);
    let path = fs::canonicalize(&link).ok()?;
    Some(PciPlace {
        numa_node: read_numa_node(&path),
        path,
    })
}

/// The host bridge (`pci0000:17`) and the chain of PCI devices below it, the device last. `None`
/// when the path has no host bridge component followed by bus ids.
fn pci_chain(path: &Path) -> Option<(String, Vec<String>)> {
    let parts: Vec<&str> = path.iter().filter_map(|c| c.to_str()).collect();
    let root_at = parts.iter().rposition(|p| {
        p.strip_prefix("pci")
            .and_then(|rest| rest.split_once(':'))
            .is_some_and(|(domain, bus)| {
                !domain.is_empty()
                    && bus.len() == 2
                    && domain
                        .bytes()
                        .chain(bus.bytes())
                        .all(|b| b.is_ascii_hexdigit())
            })
    })?;
    let chain: Vec<String> = parts[root_at + 1..]
        .iter()
        .take_while(|p| is_pci_bus_id(p))
        .map(|p| p.to_string())
        .collect();
    if chain.is_empty() {
        return None;
    }
    Some((parts[root_at].to_string(), chain))
}

/// The PCIe switches above a device, nearest first, as NCCL counts them: a switch is its
/// upstream port, two levels above what hangs below it (the downstream port between them is part
/// of the same switch), and the walk stops at the host bridge.
fn switches_above(chain: &[String]) -> Vec<&str> {
    let device_at = chain.len() - 1;
    (0..device_at)
        .rev()
        .skip(1)
        .step_by(2)
        .map(|i| chain[i].as_str())
        .collect()
}

/// How near two PCI devices are, in `nvidia-smi topo`'s words, from their resolved sysfs paths
/// and NUMA nodes:
/// - behind the same nearest PCIe switch: `PIX`;
/// - sharing a PCIe switch further up: `PXB`;
/// - under the same host bridge (`pciDDDD:BB`) without a shared switch: `PHB`;
/// - under different host bridges on the same NUMA node (or both on none): `NODE`;
/// - otherwise (different NUMA nodes, or only one known): `SYS`.
///
/// `None` when either path is not a PCI device path.
pub fn pcie_link(a: &Path, a_numa: Option<u32>, b: &Path, b_numa: Option<u32>) -> Option<PcieLink> {
    let (a_root, a_chain) = pci_chain(a)?;
    let (b_root, b_chain) = pci_chain(b)?;
    if a_root != b_root {
        return Some(if a_numa == b_numa {
            PcieLink::Node
        } else {
            PcieLink::Sys
        });
    }
    let a_switches = switches_above(&a_chain);
    let b_switches = switches_above(&b_chain);
    Some(match (a_switches.first(), b_switches.first()) {
        (Some(x), Some(y)) if x == y => PcieLink::Pix,
        _ if a_switches.iter().any(|s| b_switches.contains(s)) => PcieLink::Pxb,
        _ => PcieLink::Phb,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A path under /sys/devices from its components.
    fn p(parts: &[&str]) -> PathBuf {
        let mut path = PathBuf::from("/sys/devices");
        for part in parts {
            path.push(part);
        }
        path
    }

    #[test]
    fn links_follow_nvidia_smi_topo() {
        // Host bridge pci0000:17: a root port (17:00.0) and a switch (18:00.0 up, 19:0x.0 down)
        // with a second-level switch (1c:00.0 up, 1d:00.0 down) below one of its ports.
        let gpu = p(&[
            "pci0000:17",
            "0000:17:00.0",
            "0000:18:00.0",
            "0000:19:00.0",
            "0000:1b:00.0",
        ]);
        let nic_same_switch = p(&[
            "pci0000:17",
            "0000:17:00.0",
            "0000:18:00.0",
            "0000:19:01.0",
            "0000:1a:00.0",
        ]);
        let nic_below_second_switch = p(&[
            "pci0000:17",
            "0000:17:00.0",
            "0000:18:00.0",
            "0000:19:02.0",
            "0000:1c:00.0",
            "0000:1d:00.0",
            "0000:1e:00.0",
        ]);
        let nic_other_root_port = p(&["pci0000:17", "0000:17:02.0", "0000:20:00.0"]);
        let nic_other_bridge = p(&["pci0000:3a", "0000:3a:00.0", "0000:3b:00.0"]);
        let nic_pcie_domain = p(&["pci10000:00", "10000:00:02.0", "10000:01:00.0"]);
        let cases = [
            (
                "same switch",
                &gpu,
                Some(0),
                &nic_same_switch,
                Some(0),
                Some(PcieLink::Pix),
            ),
            (
                "a switch further up",
                &gpu,
                Some(0),
                &nic_below_second_switch,
                Some(0),
                Some(PcieLink::Pxb),
            ),
            (
                "same host bridge",
                &gpu,
                Some(0),
                &nic_other_root_port,
                Some(0),
                Some(PcieLink::Phb),
            ),
            (
                "same NUMA node",
                &gpu,
                Some(0),
                &nic_other_bridge,
                Some(0),
                Some(PcieLink::Node),
            ),
            (
                "no NUMA at all",
                &gpu,
                None,
                &nic_other_bridge,
                None,
                Some(PcieLink::Node),
            ),
            (
                "other NUMA node",
                &gpu,
                Some(0),
                &nic_other_bridge,
                Some(1),
                Some(PcieLink::Sys),
            ),
            (
                "one NUMA unknown",
                &gpu,
                Some(0),
                &nic_other_bridge,
                None,
                Some(PcieLink::Sys),
            ),
            (
                "VMD domain",
                &gpu,
                Some(0),
                &nic_pcie_domain,
                Some(1),
                Some(PcieLink::Sys),
            ),
            ("itself", &gpu, Some(0), &gpu, Some(0), Some(PcieLink::Pix)),
            (
                "not a PCI path",
                &gpu,
                Some(0),
                &PathBuf::from("/sys/devices/virtual/net/lo"),
                Some(0),
                None,
            ),
        ];
        for (what, a, a_numa, b, b_numa, want) in cases {
            assert_eq!(pcie_link(a, a_numa, b, b_numa), want, "{what}: a->b");
            assert_eq!(pcie_link(b, b_numa, a, a_numa), want, "{what}: b->a");
        }
    }

    #[test]
    fn a_device_directly_under_a_root_port_has_no_switch() {
        // Two devices under one root port each: they meet at the host bridge.
        let a = p(&["pci0000:00", "0000:00:01.0", "0000:01:00.0"]);
        let b = p(&["pci0000:00", "0000:00:02.0", "0000:02:00.0"]);
        assert_eq!(pcie_link(&a, None, &b, None), Some(PcieLink::Phb));
        // A virtual machine's flat bus: devices right under the host bridge.
        let a = p(&["pci0000:00", "0000:00:04.0"]);
        let b = p(&["pci0000:00", "0000:00:05.0"]);
        assert_eq!(pcie_link(&a, None, &b, None), Some(PcieLink::Phb));
    }

    #[test]
    fn links_sort_nearest_first() {
        let mut links = [
            PcieLink::Sys,
            PcieLink::Pix,
            PcieLink::Node,
            PcieLink::Phb,
            PcieLink::Pxb,
        ];
        links.sort();
        let words: Vec<_> = links.iter().map(|l| l.as_str()).collect();
        assert_eq!(words, ["PIX", "PXB", "PHB", "NODE", "SYS"]);
        assert_eq!(serde_json::to_string(&PcieLink::Node).unwrap(), "\"NODE\"");
    }

    #[test]
    fn bus_ids_and_numa_nodes_parse() {
        for ok in ["0000:1b:00.0", "0000:db:1f.7", "10000:01:00.0"] {
            assert!(is_pci_bus_id(ok), "{ok}");
        }
        for bad in [
            "0000:1B:00.0",
            "000:1b:00.0",
            "0000:1b:20.0",
            "0000:1b:00.8",
            "0000:1b:00",
            "",
            "mlx5_0",
        ] {
            assert!(!is_pci_bus_id(bad), "{bad}");
        }
        assert_eq!(parse_numa_node("1\n"), Some(1));
        assert_eq!(parse_numa_node("-1\n"), None);
        assert_eq!(parse_numa_node(""), None);
    }

    #[test]
    fn devices_resolve_through_the_bus_symlinks() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let dev = r.join("devices/pci0000:17/0000:17:00.0/0000:18:00.0");
        fs::create_dir_all(&dev).unwrap();
        fs::write(dev.join("numa_node"), "1\n").unwrap();
        fs::create_dir_all(r.join("bus/pci/devices")).unwrap();
        std::os::unix::fs::symlink(
            "../../../devices/pci0000:17/0000:17:00.0/0000:18:00.0",
            r.join("bus/pci/devices/0000:18:00.0"),
        )
        .unwrap();
        let place = resolve(r, "0000:18:00.0").unwrap();
        assert_eq!(place.numa_node, Some(1));
        assert!(
            place
                .path
                .ends_with("devices/pci0000:17/0000:17:00.0/0000:18:00.0"),
            "{place:?}"
        );
        assert_eq!(resolve(r, "0000:19:00.0"), None);
        assert_eq!(resolve(r, "../../etc"), None);
    }
}
