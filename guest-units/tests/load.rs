//! Loading the fixture guest trees: search path precedence, drop-ins, masking, enablement and
//! unit-file syntax, asserted value by value.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use portwake_guest_units::{
    parse_address, BindIpv6Only, GuestAddress, GuestUnits, HostSocket, ListenKind, SocketUnit,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn load(name: &str) -> GuestUnits {
    GuestUnits::load(&fixture(name)).unwrap_or_else(|e| panic!("{e}"))
}

/// A fixture path relative to tests/fixtures, for compact assertions.
fn rel(path: &Path) -> String {
    path.strip_prefix(fixture(""))
        .unwrap_or_else(|_| panic!("{} is outside the fixtures", path.display()))
        .display()
        .to_string()
}

/// One line per unit, then one indented line per listen, unsupported line and drop-in.
fn summary(units: &GuestUnits) -> String {
    let mut out = String::new();
    for u in &units.units {
        let flags = [
            (u.enabled, "enabled"),
            (u.masked, "masked"),
            (u.accept, "accept"),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .map(|(_, f)| *f)
        .collect::<Vec<_>>()
        .join(",");
        writeln!(
            out,
            "{} [{flags}] fd={} bind={} service={} at {}",
            u.name,
            u.fd_name(),
            u.bind_ipv6_only,
            u.service_name(),
            rel(&u.path)
        )
        .unwrap();
        for by in &u.enabled_by {
            writeln!(out, "  wanted by {}", rel(by)).unwrap();
        }
        for l in &u.listens {
            writeln!(
                out,
                "  {}={} -> {} at {}:{}",
                l.kind.directive(),
                l.value,
                l.address,
                rel(&l.file),
                l.line
            )
            .unwrap();
        }
        for x in &u.unsupported {
            writeln!(
                out,
                "  unsupported {}={} at {}:{}: {}",
                x.key,
                x.value,
                rel(&x.file),
                x.line,
                x.reason
            )
            .unwrap();
        }
        for d in &u.dropins {
            writeln!(out, "  drop-in {}", rel(d)).unwrap();
        }
    }
    out
}

#[test]
fn seed_guest_has_sshd_and_web_sockets() {
    let guest = load("seed");
    assert_eq!(guest.root, fixture("seed"));
    assert_eq!(
        guest.search_dirs,
        vec![
            fixture("seed/etc/systemd/system"),
            fixture("seed/lib/systemd/system")
        ]
    );
    assert_eq!(
        summary(&guest),
        "\
sshd.socket [enabled,accept] fd=sshd.socket bind=default service=sshd@.service at seed/etc/systemd/system/sshd.socket
  wanted by seed/etc/systemd/system/sockets.target.wants/sshd.socket
  ListenStream=23 -> 23 at seed/etc/systemd/system/sshd.socket:5
web.socket [enabled] fd=web bind=default service=web.service at seed/lib/systemd/system/web.socket
  wanted by seed/etc/systemd/system/sockets.target.wants/web.socket
  ListenStream=80 -> 80 at seed/lib/systemd/system/web.socket:5
  ListenStream=443 -> 443 at seed/lib/systemd/system/web.socket:6
"
    );

    let sshd = guest.unit("sshd.socket").unwrap();
    assert_eq!(sshd.listens[0].kind, ListenKind::Stream);
    assert_eq!(sshd.listens[0].address, GuestAddress::Port(23));
    assert_eq!(
        sshd.listens[0].adopted_address(true).unwrap().to_string(),
        "[::]:23"
    );
    assert_eq!(
        sshd.listens[0].adopted_address(false).unwrap().to_string(),
        "0.0.0.0:23"
    );
    assert_eq!(sshd.fd_name, None);
    assert_eq!(sshd.fd_name(), "sshd.socket");
    assert_eq!(
        guest.unit("web.socket").unwrap().fd_name,
        Some("web".to_owned())
    );
}

#[test]
fn seed_fd_order_and_names_follow_unit_names_then_file_order() {
    let guest = load("seed");
    let order: Vec<(String, String, String)> = guest
        .listen_lines()
        .map(|(u, l)| {
            (
                u.name.clone(),
                u.fd_name().to_owned(),
                l.adopted_address(true).unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        order,
        vec![
            ("sshd.socket".into(), "sshd.socket".into(), "[::]:23".into()),
            ("web.socket".into(), "web".into(), "[::]:80".into()),
            ("web.socket".into(), "web".into(), "[::]:443".into()),
        ]
    );
}

#[test]
fn seed_guest_adopts_only_the_address_systemd_parsed() {
    let guest = load("seed");
    let host = |s: &str| HostSocket::new(ListenKind::Stream, parse_address(s, true).unwrap());
    let names = |h: &HostSocket, ipv6: bool| -> Vec<String> {
        guest
            .adopters(h, ipv6)
            .iter()
            .map(|(u, l)| format!("{}:{}", u.name, l.line))
            .collect()
    };
    assert_eq!(names(&host("23"), true), vec!["sshd.socket:5"]);
    assert_eq!(names(&host("[::]:23"), true), vec!["sshd.socket:5"]);
    assert!(names(&host("0.0.0.0:23"), true).is_empty());
    assert!(names(&host("127.0.0.1:23"), true).is_empty());
    assert_eq!(names(&host("0.0.0.0:23"), false), vec!["sshd.socket:5"]);
    assert_eq!(names(&host("[::]:443"), true), vec!["web.socket:6"]);
    let datagram = HostSocket::new(
        ListenKind::Datagram,
        parse_address("[::]:23", true).unwrap(),
    );
    assert!(names(&datagram, true).is_empty());
}

#[test]
fn a_unit_directory_inside_a_guest_reads_the_whole_guest() {
    let whole = load("seed");
    let from_etc = GuestUnits::load(&fixture("seed/etc/systemd/system")).unwrap();
    assert_eq!(from_etc, whole);
    let from_lib = GuestUnits::load(&fixture("seed/lib/systemd/system/")).unwrap();
    assert_eq!(from_lib, whole);
}

#[test]
fn syntax_fixture_parses_as_systemd_does() {
    let guest = load("syntax");
    assert_eq!(
        guest.search_dirs,
        vec![
            fixture("syntax/etc/systemd/system"),
            fixture("syntax/run/systemd/system"),
            fixture("syntax/lib/systemd/system"),
            fixture("syntax/usr/lib/systemd/system"),
        ]
    );
    assert_eq!(
        summary(&guest),
        "\
api.socket [enabled] fd=api-dropin bind=both service=api.service at syntax/lib/systemd/system/api.socket
  wanted by syntax/etc/systemd/system/sockets.target.wants/api.socket
  ListenStream=/var/run/api/api.sock -> /run/api/api.sock at syntax/lib/systemd/system/api.socket:11
  ListenSequentialPacket=@api-control -> @api-control at syntax/lib/systemd/system/api.socket:12
  ListenDatagram=127.0.0.1:5353 -> 127.0.0.1:5353 at syntax/lib/systemd/system/api.socket:13
  ListenStream=[::1]:8080 -> [::1]:8080 at syntax/etc/systemd/system/api.socket.d/50-extra.conf:3
  unsupported ListenFIFO=/run/api/fifo at syntax/lib/systemd/system/api.socket:16: portwake passes sockets only, not FIFOs
  drop-in syntax/lib/systemd/system/api.socket.d/10-name.conf
  drop-in syntax/etc/systemd/system/api.socket.d/50-extra.conf
climb.socket [] fd=climb.socket bind=default service=climb.service at syntax/srv/climb.socket
  ListenStream=7008 -> 7008 at syntax/srv/climb.socket:2
disabled.socket [] fd=disabled.socket bind=default service=disabled.service at syntax/lib/systemd/system/disabled.socket
  ListenStream=7001 -> 7001 at syntax/lib/systemd/system/disabled.socket:2
empty-mask.socket [enabled,masked] fd=empty-mask.socket bind=default service=empty-mask.service at syntax/etc/systemd/system/empty-mask.socket
  wanted by syntax/lib/systemd/system/sockets.target.wants/empty-mask.socket
exotic.socket [] fd=exotic.socket bind=default service=exotic.service at syntax/lib/systemd/system/exotic.socket
  ListenStream=4444 -> 4444 at syntax/lib/systemd/system/exotic.socket:8
  unsupported ListenStream=vsock::1234 at syntax/lib/systemd/system/exotic.socket:2: portwake does not bind AF_VSOCK sockets
  unsupported ListenNetlink=kobject-uevent 1 at syntax/lib/systemd/system/exotic.socket:3: portwake does not bind netlink sockets
  unsupported ListenSpecial=/dev/log-special at syntax/lib/systemd/system/exotic.socket:4: portwake passes sockets only, not special files
  unsupported ListenMessageQueue=/mq at syntax/lib/systemd/system/exotic.socket:5: portwake passes sockets only, not POSIX message queues
  unsupported ListenUSBFunction=/run/usb at syntax/lib/systemd/system/exotic.socket:6: portwake passes sockets only, not USB FunctionFS endpoints
  unsupported SocketProtocol=sctp at syntax/lib/systemd/system/exotic.socket:7: the guest adopts only sockets of this protocol (SO_PROTOCOL); portwake binds plain TCP/UDP
masked.socket [enabled,masked] fd=masked.socket bind=default service=masked.service at syntax/etc/systemd/system/masked.socket
  wanted by syntax/lib/systemd/system/sockets.target.wants/masked.socket
override.socket [enabled] fd=override.socket bind=default service=override.service at syntax/etc/systemd/system/override.socket
  wanted by syntax/lib/systemd/system/sockets.target.wants/override.socket
  ListenStream=7003 -> 7003 at syntax/etc/systemd/system/override.socket:2
plainfile.socket [] fd=plainfile.socket bind=default service=plainfile.service at syntax/lib/systemd/system/plainfile.socket
  ListenStream=7006 -> 7006 at syntax/lib/systemd/system/plainfile.socket:2
required.socket [enabled] fd=required.socket bind=default service=required.service at syntax/usr/lib/systemd/system/required.socket
  wanted by syntax/etc/systemd/system/foo.target.requires/required.socket
  ListenDatagram=0.0.0.0:7007 -> 0.0.0.0:7007 at syntax/usr/lib/systemd/system/required.socket:2
specifiers.socket [] fd=specifiers.socket-fd bind=default service=specifiers-handler.service at syntax/run/systemd/system/specifiers.socket
  ListenStream=%t/%N.sock -> /run/specifiers.sock at syntax/run/systemd/system/specifiers.socket:2
  ListenStream=[fe80::1]:8443%%eth0 -> [fe80::1]:8443%eth0 at syntax/run/systemd/system/specifiers.socket:3
wantmask.socket [] fd=wantmask.socket bind=default service=wantmask.service at syntax/lib/systemd/system/wantmask.socket
  ListenStream=7004 -> 7004 at syntax/lib/systemd/system/wantmask.socket:2
"
    );
}

#[test]
fn syntax_fixture_active_units_are_enabled_and_unmasked() {
    let guest = load("syntax");
    let active: Vec<&str> = guest.active().map(|u| u.name.as_str()).collect();
    assert_eq!(
        active,
        vec!["api.socket", "override.socket", "required.socket"]
    );
    let masked: &SocketUnit = guest.unit("masked.socket").unwrap();
    assert!(masked.enabled && masked.masked && !masked.is_active());
    assert!(masked.listens.is_empty());
}

#[test]
fn guest_symlinks_never_reach_the_host() {
    let guest = load("syntax");
    // escape.socket -> /etc/passwd exists on the host, not in the guest: skipped, not read.
    assert!(guest.unit("escape.socket").is_none());
    // alias.socket -> /lib/systemd/system/disabled.socket is an alias, loaded once as its target.
    assert!(guest.unit("alias.socket").is_none());
    // Templates are not instantiated.
    assert!(guest.unit("getty@.socket").is_none());
    assert_eq!(
        guest.unit("climb.socket").unwrap().path,
        fixture("syntax/srv/climb.socket")
    );
}

#[test]
fn syntax_fixture_typed_values() {
    let guest = load("syntax");
    let api = guest.unit("api.socket").unwrap();
    assert_eq!(api.bind_ipv6_only, BindIpv6Only::Both);
    assert_eq!(api.fd_name.as_deref(), Some("api-dropin"));
    let kinds: Vec<ListenKind> = api.listens.iter().map(|l| l.kind).collect();
    assert_eq!(
        kinds,
        vec![
            ListenKind::Stream,
            ListenKind::SequentialPacket,
            ListenKind::Datagram,
            ListenKind::Stream
        ]
    );
    assert_eq!(
        api.listens[0].address,
        GuestAddress::Unix("/run/api/api.sock".into())
    );
    assert_eq!(
        api.listens[1].address,
        GuestAddress::Abstract("api-control".into())
    );
    assert_eq!(
        api.listens[2].address,
        GuestAddress::Inet4("127.0.0.1:5353".parse().unwrap())
    );
    assert_eq!(
        api.listens[3].address,
        GuestAddress::Inet6 {
            ip: "::1".parse().unwrap(),
            port: 8080,
            scope: None
        }
    );
    let spec = guest.unit("specifiers.socket").unwrap();
    assert_eq!(spec.service.as_deref(), Some("specifiers-handler.service"));
    assert_eq!(
        spec.listens[1].address,
        GuestAddress::Inet6 {
            ip: "fe80::1".parse().unwrap(),
            port: 8443,
            scope: Some("eth0".into())
        }
    );
}

#[test]
fn dropins_are_ordered_by_file_name_across_directories() {
    let guest = load("dropin-order");
    assert_eq!(
        summary(&guest),
        "\
foo-bar-baz.socket [] fd=specific bind=default service=foo-bar-baz.service at dropin-order/etc/systemd/system/foo-bar-baz.socket
  ListenStream=1000 -> 1000 at dropin-order/etc/systemd/system/foo-bar-baz.socket:2
  ListenStream=1001 -> 1001 at dropin-order/lib/systemd/system/socket.d/10-type.conf:4
  ListenStream=1002 -> 1002 at dropin-order/etc/systemd/system/foo-bar-.socket.d/30-prefix.conf:2
  drop-in dropin-order/lib/systemd/system/socket.d/10-type.conf
  drop-in dropin-order/lib/systemd/system/foo-bar-baz.socket.d/20-prefix.conf
  drop-in dropin-order/etc/systemd/system/foo-bar-.socket.d/30-prefix.conf
other.socket [] fd=type bind=default service=other.service at dropin-order/etc/systemd/system/other.socket
  ListenStream=2000 -> 2000 at dropin-order/etc/systemd/system/other.socket:2
  ListenStream=1001 -> 1001 at dropin-order/lib/systemd/system/socket.d/10-type.conf:4
  drop-in dropin-order/lib/systemd/system/socket.d/10-type.conf
"
    );
}

#[test]
fn plain_unit_directory_resolves_symlinks_inside_itself() {
    let guest = load("unitdir");
    assert_eq!(guest.root, fixture("unitdir"));
    assert_eq!(guest.search_dirs, vec![fixture("unitdir")]);
    assert_eq!(
        summary(&guest),
        "\
dns.socket [enabled] fd=dns bind=default service=dns.service at unitdir/dns.socket
  wanted by unitdir/sockets.target.wants/dns.socket
  ListenDatagram=[::1]:53 -> [::1]:53 at unitdir/dns.socket:2
  ListenStream=[::1]:53 -> [::1]:53 at unitdir/dns.socket:3
  drop-in unitdir/dns.socket.d/name.conf
other.socket [] fd=other.socket bind=default service=other.service at unitdir/other.socket
  ListenStream=/run/other.sock -> /run/other.sock at unitdir/other.socket:2
"
    );
    // Explicit IPv6 lines are dropped by systemd on a guest without IPv6.
    let dns = guest.unit("dns.socket").unwrap();
    assert_eq!(dns.listens[0].adopted_address(false), None);
    let host = HostSocket::new(
        ListenKind::Datagram,
        parse_address("[::1]:53", true).unwrap(),
    );
    assert_eq!(guest.adopters(&host, true).len(), 1);
    assert!(guest.adopters(&host, false).is_empty());
}
