//! Where agents' callback URLs may point. An agent chooses its `callback_url`, so without a
//! check it could make signoff call its own admin endpoint, a cloud metadata service or
//! anything else on the inside. A callback must be https (plain http only to loopback) and
//! its host must be, and resolve to, a public address unless `callback_allowed_networks`
//! covers it: checked at submission, and again on the address actually connected to at
//! delivery (a custom resolver on the webhook client), so DNS rebinding gains nothing.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use crate::config::check_outbound_url;

/// A submission waits at most this long for its callback host to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a callback address may not be connected to; delivery gives up on it for good.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CallbackRefused(pub String);

/// The addresses callbacks may reach although they are not public.
#[derive(Clone, Debug, Default)]
pub struct CallbackGuard {
    allowed: Vec<IpNet>,
}

impl CallbackGuard {
    pub fn new(allowed: Vec<IpNet>) -> Self {
        Self { allowed }
    }

    /// `None` when a callback may connect to `address`, else why not.
    pub fn refusal(&self, address: IpAddr) -> Option<CallbackRefused> {
        let kind = non_global_kind(address)?;
        // An IPv4-mapped IPv6 address reaches the IPv4 one: either form may be allowed.
        let canonical = address.to_canonical();
        if self
            .allowed
            .iter()
            .any(|network| network.contains(&address) || network.contains(&canonical))
        {
            return None;
        }
        Some(CallbackRefused(format!(
            "{address} is {kind} address, and not in callback_allowed_networks"
        )))
    }

    /// The submission-time check: https (plain http only to loopback), and a host that is,
    /// and resolves only to, addresses callbacks may reach. A name that does not resolve is
    /// refused too: no webhook could ever be delivered to it.
    pub async fn check_url(&self, text: &str) -> Result<url::Url, CallbackRefused> {
        let url = check_outbound_url(text).map_err(CallbackRefused)?;
        match url.host() {
            Some(url::Host::Ipv4(address)) => self.check_address(address.into())?,
            Some(url::Host::Ipv6(address)) => self.check_address(address.into())?,
            Some(url::Host::Domain(domain)) => {
                // Agents read these answers: they say whether the name resolved and to
                // what kind of address, never which one, so they cannot map the inside.
                let port = url.port_or_known_default().unwrap_or(443);
                let addresses = resolve(domain, port).await.map_err(|refused| {
                    tracing::info!(%refused, "callback_url refused");
                    CallbackRefused(format!("{domain} does not resolve to a usable address"))
                })?;
                for address in addresses {
                    self.check_address(address.ip()).map_err(|refused| {
                        tracing::info!(%refused, "callback_url refused");
                        CallbackRefused(format!(
                            "{domain} resolves to an address callbacks may not reach (not public, and not in callback_allowed_networks)"
                        ))
                    })?;
                }
            }
            None => return Err(CallbackRefused(format!("{text:?} has no host"))),
        }
        Ok(url)
    }

    /// The delivery-time check of the URL itself. reqwest does not call the resolver for
    /// an IP literal, so those are checked here; names are checked by `CallbackResolver`
    /// on the addresses they resolve to at connect time.
    pub fn check_before_connect(&self, text: &str) -> Result<(), CallbackRefused> {
        let url = check_outbound_url(text).map_err(CallbackRefused)?;
        match url.host() {
            Some(url::Host::Ipv4(address)) => self.check_address(address.into()),
            Some(url::Host::Ipv6(address)) => self.check_address(address.into()),
            Some(url::Host::Domain(_)) => Ok(()),
            None => Err(CallbackRefused(format!("{text:?} has no host"))),
        }
    }

    fn check_address(&self, address: IpAddr) -> Result<(), CallbackRefused> {
        self.refusal(address).map_or(Ok(()), Err)
    }

    /// The client webhooks are sent with. It is not the shared client Slack uses, because
    /// its resolver enforces this guard (Slack's own URLs are not agents' to choose), and
    /// it ignores proxy settings: through a proxy, the address connected to would be the
    /// proxy's and the check at connect time would mean nothing. Redirects are never
    /// followed: a receiver could otherwise bounce the request anywhere.
    pub fn webhook_client(&self) -> reqwest::Result<reqwest::Client> {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(Arc::new(CallbackResolver {
                guard: self.clone(),
            }))
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("signoff/", env!("CARGO_PKG_VERSION")))
            .build()
    }
}

/// Resolves callback hosts for the webhook client and refuses, before any connection, a
/// name any of whose addresses callbacks may not reach (DNS rebinding: the name may have
/// resolved elsewhere at submission).
pub struct CallbackResolver {
    guard: CallbackGuard,
}

impl CallbackResolver {
    pub fn new(guard: CallbackGuard) -> Self {
        Self { guard }
    }
}

impl reqwest::dns::Resolve for CallbackResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let guard = self.guard.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            // Port 0: reqwest puts in the URL's port.
            let addresses = resolve(&host, 0).await?;
            for address in &addresses {
                if let Some(refused) = guard.refusal(address.ip()) {
                    return Err(Box::new(CallbackRefused(format!(
                        "{host} resolves to an address callbacks may not reach: {refused}"
                    )))
                        as Box<dyn std::error::Error + Send + Sync>);
                }
            }
            Ok(Box::new(addresses.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The refusal behind a failed webhook request, if the resolver refused its address.
pub fn refusal_in(error: &reqwest::Error) -> Option<&CallbackRefused> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if let Some(refused) = current.downcast_ref::<CallbackRefused>() {
            return Some(refused);
        }
        source = current.source();
    }
    None
}

async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, CallbackRefused> {
    let lookup = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host, port)))
        .await
        .map_err(|_| CallbackRefused(format!("{host} did not resolve in time")))?
        .map_err(|error| CallbackRefused(format!("{host} does not resolve: {error}")))?;
    let addresses: Vec<SocketAddr> = lookup.collect();
    if addresses.is_empty() {
        return Err(CallbackRefused(format!("{host} resolves to no address")));
    }
    Ok(addresses)
}

/// What kind of non-public address this is ("a loopback", "a private", ...), or `None`
/// for an address on the public internet. Stricter than "not private": anything not
/// globally routable unicast is refused (std's `is_global` is not stable yet).
pub fn non_global_kind(address: IpAddr) -> Option<&'static str> {
    match address {
        IpAddr::V4(address) => non_global_v4(address),
        IpAddr::V6(address) => non_global_v6(address),
    }
}

fn non_global_v4(address: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = address.octets();
    if address.is_unspecified() || a == 0 {
        Some("an unspecified (\"this network\")")
    } else if address.is_loopback() {
        Some("a loopback")
    } else if address.is_private() {
        Some("a private")
    } else if address.is_link_local() {
        Some("a link-local")
    } else if a == 100 && (64..128).contains(&b) {
        Some("a shared (carrier-grade NAT)")
    } else if address.is_multicast() {
        Some("a multicast")
    } else if address.is_broadcast() || a >= 240 {
        Some("a reserved or broadcast")
    } else if address.is_documentation() || (a == 198 && (b == 18 || b == 19)) {
        Some("a documentation or benchmarking")
    } else if (a, b, c) == (192, 0, 0) || (a, b, c) == (192, 88, 99) {
        Some("a special-purpose")
    } else {
        None
    }
}

fn non_global_v6(address: Ipv6Addr) -> Option<&'static str> {
    let segments = address.segments();
    if let Some(embedded) = embedded_v4(address) {
        return non_global_v4(embedded);
    }
    if address.is_unspecified() {
        Some("an unspecified")
    } else if address.is_loopback() {
        Some("a loopback")
    } else if segments[0] & 0xfe00 == 0xfc00 {
        Some("a unique-local")
    } else if segments[0] & 0xffc0 == 0xfe80 || segments[0] & 0xffc0 == 0xfec0 {
        Some("a link-local")
    } else if address.is_multicast() {
        Some("a multicast")
    } else if segments[0] & 0xe000 != 0x2000 {
        // Only 2000::/3 is allocated as global unicast.
        Some("a reserved")
    } else if (segments[0] == 0x2001 && (segments[1] < 0x0200 || segments[1] == 0x0db8))
        || (segments[0] == 0x3fff && segments[1] < 0x1000)
    {
        Some("a special-purpose or documentation")
    } else {
        None
    }
}

/// The IPv4 address an IPv6 address reaches: IPv4-mapped (`::ffff:a.b.c.d`), IPv4-translated
/// (`::ffff:0:a.b.c.d`), NAT64 (`64:ff9b::a.b.c.d`) and 6to4 (`2002:AABB:CCDD::`).
fn embedded_v4(address: Ipv6Addr) -> Option<Ipv4Addr> {
    let segments = address.segments();
    let from = |high: u16, low: u16| {
        let [a, b] = high.to_be_bytes();
        let [c, d] = low.to_be_bytes();
        Ipv4Addr::new(a, b, c, d)
    };
    match segments {
        [0, 0, 0, 0, 0, 0xffff, high, low] | [0, 0, 0, 0, 0xffff, 0, high, low] => {
            Some(from(high, low))
        }
        [0x64, 0xff9b, 0, 0, 0, 0, high, low] => Some(from(high, low)),
        [0x2002, high, low, ..] => Some(from(high, low)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_public_addresses_are_classified() {
        let table: &[(&str, Option<&str>)] = &[
            ("127.0.0.1", Some("a loopback")),
            ("127.255.0.9", Some("a loopback")),
            ("10.0.0.1", Some("a private")),
            ("172.16.5.4", Some("a private")),
            ("172.31.255.255", Some("a private")),
            ("192.168.1.1", Some("a private")),
            ("169.254.169.254", Some("a link-local")),
            ("100.64.0.1", Some("a shared (carrier-grade NAT)")),
            ("100.127.255.254", Some("a shared (carrier-grade NAT)")),
            ("224.0.0.1", Some("a multicast")),
            ("239.255.255.250", Some("a multicast")),
            ("0.0.0.0", Some("an unspecified (\"this network\")")),
            ("0.1.2.3", Some("an unspecified (\"this network\")")),
            ("255.255.255.255", Some("a reserved or broadcast")),
            ("240.0.0.1", Some("a reserved or broadcast")),
            ("192.0.2.10", Some("a documentation or benchmarking")),
            ("198.18.0.1", Some("a documentation or benchmarking")),
            ("192.0.0.8", Some("a special-purpose")),
            ("::", Some("an unspecified")),
            ("::1", Some("a loopback")),
            ("fc00::1", Some("a unique-local")),
            ("fd12:3456::1", Some("a unique-local")),
            ("fe80::1", Some("a link-local")),
            ("ff02::1", Some("a multicast")),
            ("::ffff:127.0.0.1", Some("a loopback")),
            ("::ffff:10.1.2.3", Some("a private")),
            ("::ffff:169.254.169.254", Some("a link-local")),
            ("::ffff:0:127.0.0.1", Some("a loopback")),
            ("64:ff9b::10.0.0.1", Some("a private")),
            ("2002:7f00:1::", Some("a loopback")),
            ("::127.0.0.1", Some("a reserved")),
            ("100::1", Some("a reserved")),
            ("2001:db8::1", Some("a special-purpose or documentation")),
            ("2001::1", Some("a special-purpose or documentation")),
            // Public addresses.
            ("8.8.8.8", None),
            ("1.1.1.1", None),
            ("172.32.0.1", None),
            ("100.128.0.1", None),
            ("169.253.1.1", None),
            ("::ffff:8.8.8.8", None),
            ("64:ff9b::8.8.8.8", None),
            ("2606:4700:4700::1111", None),
            ("2a00:1450:4001::200e", None),
        ];
        for (address, expected) in table {
            let parsed: IpAddr = address.parse().expect("address");
            assert_eq!(non_global_kind(parsed), *expected, "{address}");
        }
    }

    #[test]
    fn allowed_networks_let_non_public_addresses_through() {
        let guard = CallbackGuard::new(vec![
            "127.0.0.0/8".parse().unwrap(),
            "10.1.0.0/16".parse().unwrap(),
        ]);
        for (address, allowed) in [
            ("127.0.0.1", true),
            ("::ffff:127.0.0.1", true),
            ("10.1.2.3", true),
            ("10.2.0.1", false),
            ("::1", false),
            ("169.254.169.254", false),
            ("8.8.8.8", true),
        ] {
            let parsed: IpAddr = address.parse().unwrap();
            assert_eq!(guard.refusal(parsed).is_none(), allowed, "{address}");
        }
        let refused = CallbackGuard::default()
            .refusal("169.254.169.254".parse().unwrap())
            .unwrap();
        assert_eq!(
            refused.0,
            "169.254.169.254 is a link-local address, and not in callback_allowed_networks"
        );
    }

    #[tokio::test]
    async fn urls_are_checked_literally_and_after_resolution() {
        let strict = CallbackGuard::default();
        for url in [
            "http://127.0.0.1:9/hook",
            "https://10.0.0.1/",
            "https://169.254.169.254/latest/meta-data/",
            "https://[::1]/",
            "https://[::ffff:127.0.0.1]/",
            "https://0.0.0.0/",
            "https://localhost/",
            "http://localhost:9/",
            "http://10.0.0.1/",
            // Other spellings of 127.0.0.1 that URL parsers accept.
            "https://2130706433/",
            "https://0x7f.1/",
            "https://127.1/",
            "ftp://example.com/",
        ] {
            assert!(strict.check_url(url).await.is_err(), "{url}");
        }
        let loopback = CallbackGuard::new(vec![
            "127.0.0.0/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
        ]);
        for url in [
            "http://127.0.0.1:9/hook",
            "https://[::1]/",
            "http://localhost:9/",
        ] {
            assert!(loopback.check_url(url).await.is_ok(), "{url}");
        }
        // Plain http stays refused for non-loopback hosts, allowed or not.
        let everything = CallbackGuard::new(vec!["10.0.0.0/8".parse().unwrap()]);
        assert!(everything.check_url("http://10.0.0.1/").await.is_err());
        assert!(everything.check_url("https://10.0.0.1/").await.is_ok());
    }

    #[test]
    fn literal_addresses_are_checked_before_connecting() {
        let strict = CallbackGuard::default();
        assert!(strict.check_before_connect("https://[::1]:8443/").is_err());
        assert!(strict.check_before_connect("http://127.0.0.1:9/").is_err());
        assert!(strict
            .check_before_connect("https://169.254.169.254/")
            .is_err());
        // Names are left to the resolver, which sees what they resolve to at connect time.
        assert!(strict.check_before_connect("https://localhost/").is_ok());
    }

    #[tokio::test]
    async fn the_resolver_refuses_names_that_resolve_inside() {
        use reqwest::dns::Resolve as _;
        let name = |host: &str| host.parse::<reqwest::dns::Name>().unwrap();
        let refused = CallbackResolver::new(CallbackGuard::default())
            .resolve(name("localhost"))
            .await
            .err()
            .expect("localhost refused");
        let refused = refused
            .downcast_ref::<CallbackRefused>()
            .expect("a CallbackRefused");
        assert!(refused.0.starts_with("localhost resolves to "), "{refused}");
        let allowed = CallbackResolver::new(CallbackGuard::new(vec![
            "127.0.0.0/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
        ]))
        .resolve(name("localhost"))
        .await
        .unwrap_or_else(|error| panic!("localhost allowed: {error}"));
        assert!(allowed
            .into_iter()
            .all(|address| address.ip().is_loopback()));
    }

    #[tokio::test]
    async fn the_webhook_client_never_connects_to_a_refused_name() {
        // Nothing listens on port 9; the refusal comes before any connection.
        let client = CallbackGuard::default().webhook_client().unwrap();
        let error = client
            .post("http://localhost:9/hook")
            .send()
            .await
            .expect_err("refused");
        let refused = refusal_in(&error).expect("the refusal is found in the error");
        assert!(refused.0.contains("loopback"), "{refused}");
    }
}
