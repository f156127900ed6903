//! Entry point of nanobox-init. As PID 1: boot the guest, then serve the agent forever.
//! With `--stdio` (not as PID 1): serve one agent connection on stdin/stdout, for tests.

use nanobox_init::{boot, log};

fn main() {
    let stdio = std::env::args().nth(1).as_deref() == Some("--stdio");
    let pid1 = std::process::id() == 1;
    if pid1 {
        boot::mount_filesystems();
        boot::loopback_up();
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log!("cannot start the runtime: {e}");
            halt(pid1);
        }
    };
    if stdio {
        if let Err(e) = runtime.block_on(nanobox_init::run_stdio()) {
            log!("{e}");
            std::process::exit(1);
        }
        return;
    }
    if !pid1 {
        log!("nanobox-init runs as PID 1 inside a NanoBox VM (or with --stdio for tests)");
        std::process::exit(2);
    }
    runtime.block_on(nanobox_init::run_init());
}

/// PID 1 must not exit (the kernel would panic with no message worth reading): power off.
fn halt(pid1: bool) -> ! {
    if pid1 {
        nanobox_init::control::power_off();
    }
    std::process::exit(1);
}
