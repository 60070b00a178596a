//! Target servers for the closed test network ("internet hosts").
//!
//! `rdr-testsrv whoami --listen 0.0.0.0:8080 --listen [::]:8080`: on each connection, sends
//! `local=<addr> peer=<addr>\n` (so a client can verify *which* destination it reached and from
//! where), then echoes everything back until EOF, then half-closes.
//! `banner`: same, but the first line is `220 banner local=<addr>` (server-first protocol).
//! `http`: HTTP/1.1; answers every request with `200` and the body
//! `local=<addr> peer=<addr> host=<Host header> path=<path>\n`, then closes.
//! `https --cert PEM --key PEM`: the same over TLS (rustls); the body adds `sni=<name>`.
//! `udp --listen ADDR`: answers each datagram with `peer=<addr>`.
//! Every accepted connection is logged to stdout: `accept local=<addr> peer=<addr>`.
use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
};

fn usage() -> ! {
    eprintln!("usage: rdr-testsrv whoami|banner|http|https|udp --listen ADDR [--listen ADDR]...");
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(mode) = args.first().cloned() else {
        usage()
    };
    let mut listens: Vec<SocketAddr> = Vec::new();
    let (mut cert, mut key) = (None, None);
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--cert" => cert = Some(it.next().unwrap_or_else(|| usage()).clone()),
            "--key" => key = Some(it.next().unwrap_or_else(|| usage()).clone()),
            "--listen" => {
                let v = it.next().unwrap_or_else(|| usage());
                listens.push(v.parse().unwrap_or_else(|e| {
                    eprintln!("bad --listen {v}: {e}");
                    std::process::exit(2)
                }));
            }
            _ => usage(),
        }
    }
    if listens.is_empty() {
        usage();
    }
    let tls = match (mode.as_str(), cert, key) {
        ("https", Some(c), Some(k)) => Some(tls_config(&c, &k)),
        ("https", _, _) => usage(),
        _ => None,
    };
    let mut handles = Vec::new();
    for addr in listens {
        let mode = mode.clone();
        handles.push(match mode.as_str() {
            "https" => {
                let l = bind_tcp(addr);
                let tls = tls.clone().expect("tls config");
                thread::spawn(move || https(l, tls))
            }
            "udp" => thread::spawn(move || udp(addr)),
            "whoami" | "banner" | "http" => {
                let l = bind_tcp(addr);
                thread::spawn(move || tcp(l, mode))
            }
            _ => usage(),
        });
    }
    println!("ready");
    std::io::stdout().flush().ok();
    for h in handles {
        let _ = h.join();
    }
}

fn bind_tcp(addr: SocketAddr) -> TcpListener {
    // std's bind sets SO_REUSEADDR on Unix; IPv6 wildcard listeners are v6-only here so a
    // separate 0.0.0.0 listener can coexist.
    if addr.is_ipv6() {
        bind_v6only(addr)
    } else {
        TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"))
    }
}

fn bind_v6only(addr: SocketAddr) -> TcpListener {
    use std::os::fd::FromRawFd;
    // SAFETY: socket/setsockopt/bind/listen on the fd created here (checked to be open);
    // every pointer passed is to a live local (`one`, a c_int of 4 bytes; `sa`, a zeroed
    // sockaddr_in6, a valid bit pattern) with its exact size. The TcpListener then takes
    // sole ownership of the fd.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let one: libc::c_int = 1;
        for opt in [
            (libc::SOL_SOCKET, libc::SO_REUSEADDR),
            (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY),
        ] {
            libc::setsockopt(fd, opt.0, opt.1, (&one as *const libc::c_int).cast(), 4);
        }
        let SocketAddr::V6(v6) = addr else {
            unreachable!()
        };
        let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
        sa.sin6_family = libc::AF_INET6 as u16;
        sa.sin6_port = v6.port().to_be();
        sa.sin6_addr.s6_addr = v6.ip().octets();
        let rc = libc::bind(
            fd,
            (&sa as *const libc::sockaddr_in6).cast(),
            size_of::<libc::sockaddr_in6>() as u32,
        );
        assert!(rc == 0, "bind {addr}: {}", std::io::Error::last_os_error());
        assert!(libc::listen(fd, 4096) == 0, "listen {addr}");
        TcpListener::from_raw_fd(fd)
    }
}

fn tcp(l: TcpListener, mode: String) {
    for conn in l.incoming() {
        let Ok(s) = conn else { continue };
        let mode = mode.clone();
        thread::spawn(move || {
            if mode == "http" {
                serve_http(s)
            } else {
                serve(s, mode == "banner")
            }
        });
    }
}

fn tls_config(cert: &str, key: &str) -> std::sync::Arc<rustls::ServerConfig> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap_or_else(|e| panic!("read {cert}: {e}"))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("parse {cert}: {e}"));
    let key = PrivateKeyDer::from_pem_file(key).unwrap_or_else(|e| panic!("read {key}: {e}"));
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server certificate");
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    std::sync::Arc::new(cfg)
}

fn https(l: TcpListener, tls: std::sync::Arc<rustls::ServerConfig>) {
    for conn in l.incoming() {
        let Ok(s) = conn else { continue };
        let tls = tls.clone();
        thread::spawn(move || {
            let (Ok(local), Ok(peer)) = (s.local_addr(), s.peer_addr()) else {
                return;
            };
            println!("accept local={local} peer={peer}");
            std::io::stdout().flush().ok();
            let Ok(conn) = rustls::ServerConnection::new(tls) else {
                return;
            };
            let mut stream = rustls::StreamOwned::new(conn, s);
            // Drive the handshake so the SNI is known before we answer.
            while stream.conn.is_handshaking() {
                if stream.conn.complete_io(&mut stream.sock).is_err() {
                    println!("tls handshake failed peer={peer}");
                    return;
                }
            }
            let sni = stream.conn.server_name().unwrap_or("").to_owned();
            answer_http(&mut stream, local, peer, &format!(" sni={sni}"));
            stream.conn.send_close_notify();
            let _ = stream.flush();
        });
    }
}

fn serve_http(mut s: TcpStream) {
    let (Ok(local), Ok(peer)) = (s.local_addr(), s.peer_addr()) else {
        return;
    };
    println!("accept local={local} peer={peer}");
    std::io::stdout().flush().ok();
    answer_http(&mut s, local, peer, "");
    let _ = s.shutdown(Shutdown::Write);
}

/// Reads one HTTP/1.x request head and answers it with what this server observed.
fn answer_http<S: Read + Write>(s: &mut S, local: SocketAddr, peer: SocketAddr, extra: &str) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16384 {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let text = String::from_utf8_lossy(&head);
    let path = text.split_whitespace().nth(1).unwrap_or("").to_owned();
    let host = text
        .lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(k, _)| k.eq_ignore_ascii_case("host"))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default();
    println!("request local={local} host={host} path={path}");
    std::io::stdout().flush().ok();
    let body = format!("local={local} peer={peer} host={host} path={path}{extra}\n");
    let resp = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(resp.as_bytes());
    let _ = s.flush();
}

fn serve(mut s: TcpStream, banner: bool) {
    let (Ok(local), Ok(peer)) = (s.local_addr(), s.peer_addr()) else {
        return;
    };
    println!("accept local={local} peer={peer}");
    std::io::stdout().flush().ok();
    let first = if banner {
        format!("220 banner local={local} peer={peer}\n")
    } else {
        format!("local={local} peer={peer}\n")
    };
    if s.write_all(first.as_bytes()).is_err() {
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    // Half-close: the client told us it is done; we are done too, after the echo.
    let _ = s.shutdown(Shutdown::Write);
}

fn udp(addr: SocketAddr) {
    let s = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"));
    let mut buf = [0u8; 2048];
    loop {
        let Ok((_, peer)) = s.recv_from(&mut buf) else {
            continue;
        };
        println!("udp peer={peer}");
        std::io::stdout().flush().ok();
        let _ = s.send_to(format!("peer={peer}\n").as_bytes(), peer);
    }
}
