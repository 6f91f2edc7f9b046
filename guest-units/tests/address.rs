//! systemd's address parsing, spelling and fd matching, as truth tables.

use portwake_guest_units::{
    compare, matches, matches_address, parse_address, AddressError, Family, GuestAddress,
    HostSocket, ListenKind, ListenLine, Mismatch,
};

fn host(kind: ListenKind, s: &str) -> HostSocket {
    HostSocket::new(kind, parse_address(s, true).unwrap())
}

fn line(kind: ListenKind, value: &str) -> ListenLine {
    ListenLine {
        kind,
        value: value.to_owned(),
        address: GuestAddress::parse(value).unwrap(),
        file: "/guest/etc/systemd/system/x.socket".into(),
        line: 3,
    }
}

#[test]
fn parses_and_spells_addresses_like_systemd() {
    // (input, guest_ipv6, systemd spelling, family)
    let table = [
        ("2222", true, "[::]:2222", Family::Inet6),
        ("2222", false, "0.0.0.0:2222", Family::Inet4),
        ("0080", true, "[::]:80", Family::Inet6),
        ("65535", true, "[::]:65535", Family::Inet6),
        ("127.0.0.1:2222", true, "127.0.0.1:2222", Family::Inet4),
        ("0.0.0.0:23", false, "0.0.0.0:23", Family::Inet4),
        ("[::]:2222", true, "[::]:2222", Family::Inet6),
        ("[::1]:53", false, "[::1]:53", Family::Inet6),
        ("[0:0:0:0:0:0:0:1]:80", true, "[::1]:80", Family::Inet6),
        (
            "[::ffff:127.0.0.1]:80",
            true,
            "[::ffff:127.0.0.1]:80",
            Family::Inet6,
        ),
        (
            "[fe80::1]:80%eth0",
            true,
            "[fe80::1]:80%eth0",
            Family::Inet6,
        ),
        ("[fe80::1]:80%2", true, "[fe80::1]:80%2", Family::Inet6),
        ("10.0.0.1:80%eth0", true, "10.0.0.1:80", Family::Inet4),
        ("/run/x.sock", true, "/run/x.sock", Family::Unix),
        ("@name", true, "@name", Family::Unix),
    ];
    for (input, ipv6, spelled, family) in table {
        let parsed = parse_address(input, ipv6).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(parsed.to_string(), spelled, "{input}");
        assert_eq!(parsed.family(ipv6), family, "{input}");
    }
}

#[test]
fn a_bare_port_stays_unresolved_until_the_guest_is_known() {
    let bare = GuestAddress::parse("2222").unwrap();
    assert_eq!(bare, GuestAddress::Port(2222));
    assert_eq!(bare.to_string(), "2222");
    assert_eq!(bare.family(true), Family::Inet6);
    assert_eq!(bare.family(false), Family::Inet4);
    assert_eq!(bare.port(), Some(2222));
    assert_eq!(GuestAddress::parse("@x").unwrap().port(), None);
}

#[test]
fn rejects_what_systemd_rejects_with_exact_messages() {
    let long = format!("/{}", "x".repeat(107));
    let table: [(&str, AddressError, &str); 19] = [
        ("", AddressError::Empty, "empty address"),
        ("0", AddressError::PortZero, "port 0 is not allowed"),
        (
            "65536",
            AddressError::PortRange("65536".into()),
            "port 65536 is out of range (1-65535)",
        ),
        (
            "127.0.0.1:0",
            AddressError::PortZero,
            "port 0 is not allowed",
        ),
        (
            "[::]:99999",
            AddressError::PortRange("99999".into()),
            "port 99999 is out of range (1-65535)",
        ),
        (
            "127.0.0.1:http",
            AddressError::InvalidPort("http".into()),
            "invalid port 'http'",
        ),
        (
            "[::1]:",
            AddressError::InvalidPort(String::new()),
            "invalid port ''",
        ),
        (
            "127.0.0.1",
            AddressError::MissingPort("127.0.0.1:PORT".into()),
            "missing port (write 127.0.0.1:PORT)",
        ),
        (
            "::1",
            AddressError::MissingPort("[::1]:PORT".into()),
            "missing port (write [::1]:PORT)",
        ),
        (
            "300.0.0.1:80",
            AddressError::InvalidIpv4("300.0.0.1".into()),
            "'300.0.0.1' is not an IPv4 address",
        ),
        (
            "[::g]:80",
            AddressError::InvalidIpv6("::g".into()),
            "'::g' is not an IPv6 address",
        ),
        (
            "[fe80::1%eth0]:80",
            AddressError::ScopeInsideBrackets("[fe80::1]:80%eth0".into()),
            "systemd reads the interface after the port: write [fe80::1]:80%eth0",
        ),
        (
            "[fe80::1]:80%a/b",
            AddressError::InvalidInterface("a/b".into()),
            "'a/b' is not a valid interface name",
        ),
        (
            "[fe80::1]:80%",
            AddressError::InvalidInterface(String::new()),
            "'' is not a valid interface name",
        ),
        (
            "1.2.3.4:53#dns.example",
            AddressError::ServerName,
            "a '#' server name is not allowed in a socket address",
        ),
        ("@", AddressError::UnixEmpty, "unix socket name is empty"),
        (
            &long,
            AddressError::UnixTooLong(108),
            "unix socket path is 108 bytes, longer than the 107 that fit",
        ),
        (
            "vsock:2:1234",
            AddressError::Vsock,
            "AF_VSOCK addresses are not supported",
        ),
        (
            "run/x.sock",
            AddressError::Unrecognized,
            "not a port, IPv4:PORT, [IPv6]:PORT, absolute unix path or @abstract name",
        ),
    ];
    for (input, error, message) in table {
        let got = GuestAddress::parse(input).unwrap_err();
        assert_eq!(got, error, "{input}");
        assert_eq!(got.to_string(), message, "{input}");
    }
    // The longest path that fits is accepted.
    let fits = format!("/{}", "x".repeat(106));
    assert!(GuestAddress::parse(&fits).is_ok());
    assert_eq!(
        AddressError::SequentialPacketNeedsUnix.to_string(),
        "SOCK_SEQPACKET needs a unix socket address"
    );
}

#[test]
fn listen_stream_2222_truth_table() {
    use ListenKind::Stream;
    let l = line(Stream, "2222");
    // (host socket, guest_ipv6, adopted)
    let table = [
        ("127.0.0.1:2222", true, false),
        ("0.0.0.0:2222", true, false),
        ("[::]:2222", true, true),
        ("2222", true, true),
        ("[::1]:2222", true, false),
        ("[::]:2223", true, false),
        ("0.0.0.0:2222", false, true),
        ("127.0.0.1:2222", false, false),
        ("[::]:2222", false, false),
    ];
    for (h, ipv6, want) in table {
        assert_eq!(
            matches(&l, &host(Stream, h), ipv6),
            want,
            "ListenStream=2222 vs {h}, guest_ipv6={ipv6}"
        );
    }
    assert!(!matches(&l, &host(ListenKind::Datagram, "[::]:2222"), true));
}

#[test]
fn explicit_addresses_truth_table() {
    use ListenKind::{Datagram, SequentialPacket, Stream};
    // (guest kind, guest value, host kind, host address, guest_ipv6, adopted)
    let table = [
        (
            Stream,
            "127.0.0.1:2222",
            Stream,
            "127.0.0.1:2222",
            true,
            true,
        ),
        (
            Stream,
            "127.0.0.1:2222",
            Stream,
            "127.0.0.1:2222",
            false,
            true,
        ),
        (
            Stream,
            "127.0.0.1:2222",
            Stream,
            "0.0.0.0:2222",
            true,
            false,
        ),
        (
            Stream,
            "127.0.0.1:2222",
            Stream,
            "[::ffff:127.0.0.1]:2222",
            true,
            false,
        ),
        (Stream, "0.0.0.0:2222", Stream, "[::]:2222", true, false),
        (
            Datagram,
            "127.0.0.1:5353",
            Datagram,
            "127.0.0.1:5353",
            true,
            true,
        ),
        (
            Datagram,
            "127.0.0.1:5353",
            Stream,
            "127.0.0.1:5353",
            true,
            false,
        ),
        (Stream, "[::1]:8080", Stream, "[::1]:8080", true, true),
        (Stream, "[::1]:8080", Stream, "[::1]:8080", false, false),
        // The scope is not compared (socket_address_equal() ignores sin6_scope_id).
        (
            Stream,
            "[fe80::1]:80%eth0",
            Stream,
            "[fe80::1]:80",
            true,
            true,
        ),
        (
            Stream,
            "[fe80::1]:80%eth0",
            Stream,
            "[fe80::1]:80%eth1",
            true,
            true,
        ),
        (Stream, "/run/x.sock", Stream, "/run/x.sock", true, true),
        (Stream, "/run/x.sock", Stream, "/run//./x.sock/", true, true),
        (Stream, "/run/x.sock", Stream, "/run/y.sock", true, false),
        (Stream, "/run/x.sock", Datagram, "/run/x.sock", true, false),
        (
            SequentialPacket,
            "/run/x.sock",
            SequentialPacket,
            "/run/x.sock",
            true,
            true,
        ),
        (
            SequentialPacket,
            "@ctl",
            SequentialPacket,
            "@ctl",
            false,
            true,
        ),
        (Stream, "@ctl", Stream, "@ctl2", true, false),
        (Stream, "@run/x.sock", Stream, "/run/x.sock", true, false),
        (Stream, "/run/x.sock", Stream, "[::]:2222", true, false),
    ];
    for (gk, gv, hk, hv, ipv6, want) in table {
        let got = matches(&line(gk, gv), &host(hk, hv), ipv6);
        assert_eq!(got, want, "{gk} {gv} vs {hk} {hv}, guest_ipv6={ipv6}");
    }
}

#[test]
fn mismatches_say_what_differs() {
    use ListenKind::{Datagram, Stream};
    let bare = GuestAddress::Port(2222);
    let cases = [
        (
            compare(Stream, &bare, &host(Stream, "127.0.0.1:2222"), true),
            "family differs: guest AF_INET6, host AF_INET",
        ),
        (
            compare(Stream, &bare, &host(Datagram, "[::]:2222"), true),
            "socket type differs: guest SOCK_STREAM, host SOCK_DGRAM",
        ),
        (
            compare(Stream, &bare, &host(Stream, "[::1]:2222"), true),
            "address differs: guest [::]:2222, host [::1]:2222",
        ),
        (
            compare(
                Stream,
                &GuestAddress::parse("[::1]:1").unwrap(),
                &host(Stream, "[::1]:1"),
                false,
            ),
            "the guest has no IPv6, so systemd drops the line",
        ),
    ];
    for (got, message) in cases {
        assert_eq!(got.unwrap_err().to_string(), message);
    }
    assert_eq!(
        compare(Stream, &bare, &host(Stream, "127.0.0.1:2222"), true),
        Err(Mismatch::Family {
            guest: Family::Inet6,
            host: Family::Inet4
        })
    );
    assert_eq!(
        compare(Stream, &bare, &host(Stream, "[::]:2222"), true),
        Ok(())
    );
}

#[test]
fn host_sockets_are_plain_data() {
    let h = HostSocket::new(ListenKind::Stream, GuestAddress::Port(80));
    assert_eq!(h.family, Family::Inet6);
    assert_eq!(h.resolved().to_string(), "[::]:80");
    assert_eq!(h.to_string(), "Stream [::]:80 (AF_INET6)");
    // A bare port read in the family the caller states, e.g. from getsockname().
    let v4 = HostSocket {
        family: Family::Inet4,
        kind: ListenKind::Stream,
        address: GuestAddress::Port(80),
    };
    assert_eq!(v4.resolved().to_string(), "0.0.0.0:80");
    assert!(matches_address(
        ListenKind::Stream,
        &GuestAddress::Port(80),
        &v4,
        false
    ));
    assert!(!matches_address(
        ListenKind::Stream,
        &GuestAddress::Port(80),
        &v4,
        true
    ));
    // A family that contradicts the address matches nothing.
    let liar = HostSocket {
        family: Family::Inet6,
        kind: ListenKind::Stream,
        address: parse_address("0.0.0.0:80", true).unwrap(),
    };
    assert!(!matches_address(
        ListenKind::Stream,
        &GuestAddress::Port(80),
        &liar,
        true
    ));
    assert_eq!(Family::Unix.to_string(), "AF_UNIX");
    assert_eq!(
        ListenKind::SequentialPacket.directive(),
        "ListenSequentialPacket"
    );
    assert_eq!(
        ListenKind::from_directive("ListenDatagram"),
        Some(ListenKind::Datagram)
    );
    assert_eq!(ListenKind::from_directive("ListenFIFO"), None);
}
