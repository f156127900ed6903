//! Links, addresses and routes over rtnetlink, in any namespace: a netlink socket belongs
//! to the namespace of the thread that creates it, so [`Netlink::connect`] creates it on
//! a thread inside the target namespace and then drives it from the runtime as usual.

use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd as _;
use std::path::Path;

use futures::TryStreamExt as _;
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::NetError;

/// A netlink connection to one namespace. Dropping it closes the socket, which matters:
/// an open socket would keep a deleted namespace alive.
#[derive(Debug)]
pub(crate) struct Netlink {
    handle: Handle,
    task: tokio::task::JoinHandle<()>,
    ns: String,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

impl Netlink {
    /// Connects to the namespace at `ns` (`None`: this process's own).
    pub async fn connect(ns: Option<&Path>) -> Result<Self, NetError> {
        let name = ns.map_or_else(
            || "the agent's namespace".to_owned(),
            |p| p.display().to_string(),
        );
        let runtime = tokio::runtime::Handle::current();
        let (connection, handle, _) = crate::netns::run_in(ns, move || {
            // The socket registers with the runtime's reactor as it is created.
            let _entered = runtime.enter();
            rtnetlink::new_connection()
        })
        .await
        .map_err(|e| NetError::io(format!("opening a netlink socket in {name}"), e))?;
        Ok(Self {
            handle,
            task: tokio::spawn(connection),
            ns: name,
        })
    }

    fn err(&self, what: String) -> impl FnOnce(rtnetlink::Error) -> NetError + '_ {
        move |e| NetError::netlink(format!("{what} in {}", self.ns), e)
    }

    /// The index of the link `name`, if it exists.
    pub async fn index(&self, name: &str) -> Result<Option<u32>, NetError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(link) => Ok(link.map(|l| l.header.index)),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
            Err(e) => Err(self.err(format!("looking up link {name}"))(e)),
        }
    }

    /// The index of `name`, which must exist.
    pub async fn require(&self, name: &str) -> Result<u32, NetError> {
        self.index(name).await?.ok_or_else(|| {
            NetError::io(
                format!("link {name} not found in {}", self.ns),
                std::io::ErrorKind::NotFound.into(),
            )
        })
    }

    /// Every link, as (index, name, controller index).
    pub async fn links(&self) -> Result<Vec<(u32, String, Option<u32>)>, NetError> {
        let messages: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(self.err("listing links".into()))?;
        Ok(messages
            .into_iter()
            .map(|m| {
                let mut name = String::new();
                let mut controller = None;
                for attr in m.attributes {
                    match attr {
                        LinkAttribute::IfName(n) => name = n,
                        LinkAttribute::Controller(c) => controller = Some(c),
                        _ => {}
                    }
                }
                (m.header.index, name, controller)
            })
            .collect())
    }

    /// Creates a bridge unless a link of that name exists.
    pub async fn ensure_bridge(&self, name: &str) -> Result<u32, NetError> {
        if let Some(index) = self.index(name).await? {
            return Ok(index);
        }
        match self
            .handle
            .link()
            .add(LinkBridge::new(name).build())
            .execute()
            .await
        {
            Ok(()) => {}
            // Another agent thread or process got there first: fine.
            Err(e) if errno(&e) == Some(libc::EEXIST) => {}
            Err(e) => return Err(self.err(format!("creating bridge {name}"))(e)),
        }
        self.require(name).await
    }

    /// Creates a veth pair.
    pub async fn add_veth(&self, name: &str, peer: &str) -> Result<(), NetError> {
        self.handle
            .link()
            .add(LinkVeth::new(name, peer).build())
            .execute()
            .await
            .map_err(self.err(format!("creating veth pair {name}/{peer}")))
    }

    /// Moves a link into the namespace open as `target`.
    pub async fn move_to(&self, index: u32, target: &std::fs::File) -> Result<(), NetError> {
        self.set(
            LinkUnspec::new_with_index(index)
                .setns_by_fd(target.as_raw_fd())
                .build(),
            format!("moving link {index} to another namespace"),
        )
        .await
    }

    /// Sets the hardware address.
    pub async fn set_mac(&self, index: u32, mac: [u8; 6]) -> Result<(), NetError> {
        self.set(
            LinkUnspec::new_with_index(index)
                .address(mac.to_vec())
                .build(),
            format!("setting the MAC of link {index}"),
        )
        .await
    }

    /// Attaches a link to a bridge.
    pub async fn set_controller(&self, index: u32, bridge: u32) -> Result<(), NetError> {
        self.set(
            LinkUnspec::new_with_index(index).controller(bridge).build(),
            format!("attaching link {index} to bridge {bridge}"),
        )
        .await
    }

    /// Brings a link up.
    pub async fn up(&self, index: u32) -> Result<(), NetError> {
        self.set(
            LinkUnspec::new_with_index(index).up().build(),
            format!("bringing link {index} up"),
        )
        .await
    }

    async fn set(&self, message: LinkMessage, what: String) -> Result<(), NetError> {
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(self.err(what))
    }

    /// Deletes a link; a link already gone is not an error.
    pub async fn delete(&self, index: u32) -> Result<(), NetError> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(()),
            Err(e) => Err(self.err(format!("deleting link {index}"))(e)),
        }
    }

    /// Adds an address; an address already there is not an error (setup is idempotent).
    pub async fn add_address(
        &self,
        index: u32,
        addr: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), NetError> {
        match self
            .handle
            .address()
            .add(index, IpAddr::V4(addr), prefix_len)
            .execute()
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(self
                .err(format!("adding {addr}/{prefix_len} to link {index}"))(
                e
            )),
        }
    }

    /// Adds the default route via `gateway`.
    pub async fn add_default_route(&self, gateway: Ipv4Addr) -> Result<(), NetError> {
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .gateway(gateway)
            .build();
        self.handle
            .route()
            .add(route)
            .execute()
            .await
            .map_err(self.err(format!("adding the default route via {gateway}")))
    }
}
