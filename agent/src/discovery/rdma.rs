//! RDMA devices from sysfs (`/sys/class/infiniband`), without rdma-core: ports, state, link
//! layer, rate, the GID table with RoCE types, the Ethernet interface of RoCE ports, PCI bus id
//! and NUMA node.
//!
//! Each file is read by a small function and parsed by a pure one; a file that is missing or
//! unreadable leaves its fact empty. Strings are kept only in the form the coordinator accepts
//! (printable, bounded), so one odd value never makes a registration fail.

use std::fs;
use std::path::Path;

use super::pci::{is_pci_bus_id, read_numa_node};

/// Most GID entries listed per port: the coordinator refuses more
/// (`RDMA_GIDS_LISTED_PER_PORT_MAX`); mlx5 tables hold 128 (InfiniBand) or 255 (RoCE) entries.
pub const GIDS_LISTED_PER_PORT_MAX: usize = 256;

/// Longest GID type word kept (the coordinator's `DEVICE_WORD_CHARS_MAX`).
const GID_KIND_CHARS_MAX: usize = 32;

/// Longest network interface name (Linux's `IFNAMSIZ` less the NUL).
pub const NETDEV_CHARS_MAX: usize = 15;

/// One RDMA device, e.g. `mlx5_0`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RdmaDevice {
    /// The device name under `/sys/class/infiniband`.
    pub name: String,
    /// Its ports, sorted by number.
    pub ports: Vec<RdmaPort>,
    /// The PCI bus id (`0000:3b:00.0`) its `device` link points at; empty for a software device
    /// (rxe, siw) or when unknown.
    pub pci_bus_id: String,
    /// The device's NUMA node; `None` when unknown.
    pub numa_node: Option<u32>,
}

/// One port of an RDMA device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RdmaPort {
    /// The port number (from 1).
    pub port: u32,
    /// The port state word, e.g. "ACTIVE", "DOWN", "INIT".
    pub state: String,
    /// "InfiniBand" or "Ethernet" (RoCE).
    pub link_layer: String,
    /// The rate as the kernel writes it, e.g. "400 Gb/sec (4X NDR)".
    pub rate: String,
    /// GID table entries that are set (non-zero).
    pub gid_count: u32,
    /// The Ethernet interface of a RoCE port, e.g. `eth2`; empty for InfiniBand or when unknown.
    pub netdev: String,
    /// The set GID entries by index (at most [`GIDS_LISTED_PER_PORT_MAX`]).
    pub gids: Vec<RdmaGid>,
}

/// One set entry of a port's GID table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RdmaGid {
    /// The index in the table (what `NCCL_IB_GID_INDEX` names).
    pub index: u32,
    /// Eight groups of four lowercase hex digits.
    pub gid: String,
    /// "IB/RoCE v1" or "RoCE v2" as `gid_attrs/types/<index>` writes it; empty when unknown.
    pub kind: String,
}

/// Reads RDMA devices from `<sysfs_root>/class/infiniband`. Returns an empty list when the
/// directory does not exist (no RDMA hardware or driver). In production `sysfs_root` is `/sys`.
pub fn read_rdma_devices(sysfs_root: &Path) -> Vec<RdmaDevice> {
    let class = sysfs_root.join("class/infiniband");
    let Ok(entries) = fs::read_dir(&class) else {
        return Vec::new();
    };
    let mut devices: Vec<RdmaDevice> = entries
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().to_str()?.to_owned();
            let dir = entry.path();
            let device = dir.join("device");
            Some(RdmaDevice {
                ports: read_ports(&dir.join("ports"), &device),
                pci_bus_id: fs::canonicalize(&device)
                    .ok()
                    .and_then(|p| Some(p.file_name()?.to_str()?.to_owned()))
                    .filter(|id| is_pci_bus_id(id))
                    .unwrap_or_default(),
                numa_node: read_numa_node(&device),
                name,
            })
        })
        .collect();
    devices.sort_by(|a, b| a.name.cmp(&b.name));
    devices
}

fn read_trimmed(path: &Path) -> String {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The file names of `dir` that are numbers, sorted.
fn numbered_entries(dir: &Path) -> Vec<u32> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut numbers: Vec<u32> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    numbers.sort_unstable();
    numbers
}

fn read_ports(ports_dir: &Path, device_dir: &Path) -> Vec<RdmaPort> {
    numbered_entries(ports_dir)
        .into_iter()
        .map(|port| {
            let dir = ports_dir.join(port.to_string());
            let link_layer = read_trimmed(&dir.join("link_layer"));
            let (gid_count, gids) = read_gids(&dir);
            let netdev = if link_layer == "Ethernet" {
                roce_netdev(&dir, &gids, device_dir, port)
            } else {
                String::new()
            };
            RdmaPort {
                port,
                state: state_word(&read_trimmed(&dir.join("state"))),
                link_layer,
                rate: read_trimmed(&dir.join("rate")),
                gid_count,
                netdev,
                gids,
            }
        })
        .collect()
}

/// "4: ACTIVE" -> "ACTIVE"; a value without a number is kept as it is.
pub fn state_word(raw: &str) -> String {
    match raw.split_once(':') {
        Some((_, word)) => word.trim().to_owned(),
        None => raw.trim().to_owned(),
    }
}

/// A GID as sysfs writes it (`fe80:0000:...`, eight groups of four hex digits), lowercased;
/// `None` for the all-zero (unset) entry or anything that is not a GID.
pub fn parse_gid(raw: &str) -> Option<String> {
    let gid = raw.trim().to_ascii_lowercase();
    let groups: Vec<&str> = gid.split(':').collect();
    let well_formed = groups.len() == 8
        && groups
            .iter()
            .all(|g| g.len() == 4 && g.bytes().all(|b| b.is_ascii_hexdigit()));
    (well_formed && gid.bytes().any(|b| b != b'0' && b != b':')).then_some(gid)
}

/// A short word from sysfs kept only if it is printable ASCII of at most `max` characters.
fn printable_word(raw: &str, max: usize) -> String {
    let word = raw.trim();
    if word.len() <= max && word.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        word.to_owned()
    } else {
        String::new()
    }
}

/// A network interface name kept only if Linux could have made it (1 to 15 printable characters
/// without '/', ':' or spaces).
pub fn netdev_name(raw: &str) -> Option<String> {
    let name = raw.trim();
    (!name.is_empty()
        && name.len() <= NETDEV_CHARS_MAX
        && name
            .bytes()
            .all(|b| (b'!'..=b'~').contains(&b) && b != b'/' && b != b':'))
    .then(|| name.to_owned())
}

/// The set GIDs of a port (`gids/<i>`, and `gid_attrs/types/<i>`): the count of all set
/// entries, and the first [`GIDS_LISTED_PER_PORT_MAX`] of them by index. An entry that cannot be
/// read (the kernel answers EINVAL for unset RoCE entries) is not set.
fn read_gids(port_dir: &Path) -> (u32, Vec<RdmaGid>) {
    let gids_dir = port_dir.join("gids");
    let types_dir = port_dir.join("gid_attrs/types");
    let mut count = 0;
    let mut gids = Vec::new();
    for index in numbered_entries(&gids_dir) {
        let Some(gid) = fs::read_to_string(gids_dir.join(index.to_string()))
            .ok()
            .and_then(|raw| parse_gid(&raw))
        else {
            continue;
        };
        count += 1;
        if gids.len() < GIDS_LISTED_PER_PORT_MAX {
            gids.push(RdmaGid {
                index,
                gid,
                kind: printable_word(
                    &read_trimmed(&types_dir.join(index.to_string())),
                    GID_KIND_CHARS_MAX,
                ),
            });
        }
    }
    (count, gids)
}

/// The Ethernet interface of a RoCE port: the `gid_attrs/ndevs/<i>` of its first set GID that
/// names one, else the interface under `device/net/` whose `dev_port` is this port's (0-based;
/// a missing `dev_port` counts as 0), the first by name.
fn roce_netdev(port_dir: &Path, gids: &[RdmaGid], device_dir: &Path, port: u32) -> String {
    let ndevs = port_dir.join("gid_attrs/ndevs");
    if let Some(name) = gids
        .iter()
        .find_map(|g| netdev_name(&read_trimmed(&ndevs.join(g.index.to_string()))))
    {
        return name;
    }
    let Ok(entries) = fs::read_dir(device_dir.join("net")) else {
        return String::new();
    };
    let mut candidates: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| {
            let dev_port = read_trimmed(&e.path().join("dev_port"));
            dev_port.parse::<u32>().unwrap_or(0) + 1 == port
        })
        .filter_map(|e| netdev_name(e.file_name().to_str()?))
        .collect();
    candidates.sort();
    candidates.into_iter().next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    const ZERO_GID: &str = "0000:0000:0000:0000:0000:0000:0000:0000\n";

    fn write(path: PathBuf, content: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
    }

    fn fake_port(root: &Path, dev: &str, port: u32, state: &str, layer: &str, rate: &str) {
        let dir = root.join(format!("class/infiniband/{dev}/ports/{port}"));
        write(dir.join("state"), &format!("{state}\n"));
        write(dir.join("link_layer"), &format!("{layer}\n"));
        write(dir.join("rate"), &format!("{rate}\n"));
    }

    /// A PCI device at `devices/pci0000:<bus>/<id>` with a NUMA node, and the device's `device`
    /// link from the infiniband class.
    fn fake_pci_device(root: &Path, dev: &str, id: &str, numa: &str) {
        let pci = root.join(format!("devices/pci0000:{}/{id}", &id[5..7]));
        write(pci.join("numa_node"), numa);
        let class = root.join(format!("class/infiniband/{dev}"));
        fs::create_dir_all(&class).unwrap();
        std::os::unix::fs::symlink(&pci, class.join("device")).unwrap();
    }

    fn port(n: u32, state: &str, layer: &str, rate: &str) -> RdmaPort {
        RdmaPort {
            port: n,
            state: state.into(),
            link_layer: layer.into(),
            rate: rate.into(),
            gid_count: 0,
            netdev: String::new(),
            gids: Vec::new(),
        }
    }

    fn gid(index: u32, gid: &str, kind: &str) -> RdmaGid {
        RdmaGid {
            index,
            gid: gid.into(),
            kind: kind.into(),
        }
    }

    #[test]
    fn rdma_devices_are_read_from_a_sysfs_tree() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fake_port(r, "mlx5_1", 1, "1: DOWN", "Ethernet", "100 Gb/sec (4X EDR)");
        fake_port(
            r,
            "mlx5_0",
            2,
            "4: ACTIVE",
            "InfiniBand",
            "200 Gb/sec (4X HDR)",
        );
        fake_port(
            r,
            "mlx5_0",
            1,
            "4: ACTIVE",
            "InfiniBand",
            "400 Gb/sec (4X NDR)",
        );
        fake_pci_device(r, "mlx5_0", "0000:3b:00.0", "0\n");
        let ib = r.join("class/infiniband/mlx5_0/ports/1");
        write(
            ib.join("gids/0"),
            "fe80:0000:0000:0000:0ac4:7aff:feb3:1234\n",
        );
        write(
            ib.join("gids/1"),
            "0000:0000:0000:0000:0000:ffff:0a00:0001\n",
        );
        write(ib.join("gids/2"), ZERO_GID);
        write(ib.join("gids/10"), ZERO_GID);
        // InfiniBand: types exist on newer kernels; ndevs are empty and ignored.
        write(ib.join("gid_attrs/types/0"), "IB/RoCE v1\n");
        write(ib.join("gid_attrs/ndevs/0"), "\n");
        // A RoCE port: v1 and v2 entries, the netdev from ndevs, a corrupt entry skipped.
        let roce = r.join("class/infiniband/mlx5_1/ports/1");
        write(
            roce.join("gids/0"),
            "FE80:0000:0000:0000:0ac4:7aff:feb3:5678\n",
        );
        write(
            roce.join("gids/1"),
            "fe80:0000:0000:0000:0ac4:7aff:feb3:5678\n",
        );
        write(
            roce.join("gids/2"),
            "0000:0000:0000:0000:0000:ffff:0a00:0102\n",
        );
        write(roce.join("gids/3"), "not a gid\n");
        write(roce.join("gid_attrs/types/0"), "IB/RoCE v1\n");
        write(roce.join("gid_attrs/types/1"), "RoCE v2\n");
        write(roce.join("gid_attrs/types/2"), "RoCE v2\u{1b}[31m\n");
        write(roce.join("gid_attrs/ndevs/0"), "eth2\n");

        let devices = read_rdma_devices(r);
        let mut ib_port = port(1, "ACTIVE", "InfiniBand", "400 Gb/sec (4X NDR)");
        ib_port.gid_count = 2;
        ib_port.gids = vec![
            gid(0, "fe80:0000:0000:0000:0ac4:7aff:feb3:1234", "IB/RoCE v1"),
            gid(1, "0000:0000:0000:0000:0000:ffff:0a00:0001", ""),
        ];
        let mut roce_port = port(1, "DOWN", "Ethernet", "100 Gb/sec (4X EDR)");
        roce_port.gid_count = 3;
        roce_port.netdev = "eth2".into();
        roce_port.gids = vec![
            gid(0, "fe80:0000:0000:0000:0ac4:7aff:feb3:5678", "IB/RoCE v1"),
            gid(1, "fe80:0000:0000:0000:0ac4:7aff:feb3:5678", "RoCE v2"),
            gid(2, "0000:0000:0000:0000:0000:ffff:0a00:0102", ""),
        ];
        assert_eq!(
            devices,
            vec![
                RdmaDevice {
                    name: "mlx5_0".into(),
                    ports: vec![
                        ib_port,
                        port(2, "ACTIVE", "InfiniBand", "200 Gb/sec (4X HDR)")
                    ],
                    pci_bus_id: "0000:3b:00.0".into(),
                    numa_node: Some(0),
                },
                RdmaDevice {
                    name: "mlx5_1".into(),
                    ports: vec![roce_port],
                    pci_bus_id: String::new(),
                    numa_node: None,
                },
            ]
        );
    }

    #[test]
    fn a_roce_netdev_without_ndevs_comes_from_the_device_net_directory() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fake_pci_device(r, "mlx5_2", "0000:5e:00.0", "-1\n");
        fake_port(
            r,
            "mlx5_2",
            1,
            "4: ACTIVE",
            "Ethernet",
            "200 Gb/sec (4X HDR)",
        );
        fake_port(
            r,
            "mlx5_2",
            2,
            "4: ACTIVE",
            "Ethernet",
            "200 Gb/sec (4X HDR)",
        );
        let pci = r.join("devices/pci0000:5e/0000:5e:00.0");
        write(pci.join("net/ens1f0np0/dev_port"), "0\n");
        write(pci.join("net/ens1f1np1/dev_port"), "1\n");
        let devices = read_rdma_devices(r);
        let netdevs: Vec<&str> = devices[0].ports.iter().map(|p| p.netdev.as_str()).collect();
        assert_eq!(netdevs, ["ens1f0np0", "ens1f1np1"]);
        assert_eq!(devices[0].numa_node, None, "-1 is no NUMA node");
        assert_eq!(devices[0].pci_bus_id, "0000:5e:00.0");
    }

    #[test]
    fn gid_lists_are_bounded_but_counted_in_full() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fake_port(r, "rxe0", 1, "4: ACTIVE", "Ethernet", "10 Gb/sec");
        let gids = r.join("class/infiniband/rxe0/ports/1/gids");
        for i in 0..300u32 {
            write(
                gids.join(i.to_string()),
                &format!("fe80:0000:0000:0000:0000:0000:0000:{:04x}\n", i + 1),
            );
        }
        let devices = read_rdma_devices(r);
        let p = &devices[0].ports[0];
        assert_eq!(p.gid_count, 300);
        assert_eq!(p.gids.len(), GIDS_LISTED_PER_PORT_MAX);
        assert_eq!(
            p.gids.last().unwrap().index,
            GIDS_LISTED_PER_PORT_MAX as u32 - 1
        );
        assert_eq!(
            devices[0].pci_bus_id, "",
            "a software device has no PCI device"
        );
    }

    #[test]
    fn no_infiniband_class_means_no_rdma_devices() {
        let root = tempfile::tempdir().unwrap();
        assert!(read_rdma_devices(root.path()).is_empty());
        assert!(read_rdma_devices(Path::new("/nonexistent-sysfs-root")).is_empty());
    }

    #[test]
    fn this_host_sysfs_is_read_without_error() {
        // On a machine without RDMA hardware this is empty; with it, every port has a state.
        for dev in read_rdma_devices(Path::new("/sys")) {
            for port in dev.ports {
                assert!(!port.state.is_empty(), "{}/{}", dev.name, port.port);
            }
        }
    }

    #[test]
    fn parsers_keep_only_what_the_coordinator_accepts() {
        assert_eq!(state_word("4: ACTIVE"), "ACTIVE");
        assert_eq!(state_word("1: DOWN"), "DOWN");
        assert_eq!(state_word("ACTIVE"), "ACTIVE");
        assert_eq!(state_word(""), "");
        let gids = [
            (
                "fe80:0000:0000:0000:0ac4:7aff:feb3:1234\n",
                Some("fe80:0000:0000:0000:0ac4:7aff:feb3:1234"),
            ),
            (
                "FE80:0000:0000:0000:0AC4:7AFF:FEB3:1234",
                Some("fe80:0000:0000:0000:0ac4:7aff:feb3:1234"),
            ),
            (ZERO_GID, None),
            ("fe80::1", None),
            ("fe80:0000:0000:0000:0ac4:7aff:feb3:12345", None),
            ("", None),
        ];
        for (raw, want) in gids {
            assert_eq!(parse_gid(raw).as_deref(), want, "{raw:?}");
        }
        let names = [
            ("eth0\n", Some("eth0")),
            ("ens1f0np0", Some("ens1f0np0")),
            ("", None),
            ("a-very-long-interface", None),
            ("eth0:1", None),
            ("a/b", None),
            ("a b", None),
        ];
        for (raw, want) in names {
            assert_eq!(netdev_name(raw).as_deref(), want, "{raw:?}");
        }
        assert_eq!(printable_word("RoCE v2\n", 32), "RoCE v2");
        assert_eq!(printable_word("RoCE\u{7}", 32), "");
        assert_eq!(printable_word(&"x".repeat(33), 32), "");
    }
}
