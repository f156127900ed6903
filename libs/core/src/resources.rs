//! The size of a sandbox.

use std::ops::RangeInclusive;

use crate::CoreError;

/// The vCPUs a sandbox may have.
const VCPU: RangeInclusive<u32> = 1..=32;
/// The memory (MiB) a sandbox may have.
const MEMORY_MB: RangeInclusive<u32> = 64..=65_536;
/// The disk size (MiB) a sandbox may ask for: 64 MiB to 1 TiB.
const DISK_MB: RangeInclusive<u32> = 64..=1_048_576;

/// The vCPUs, memory and disk of one sandbox, validated against the limits above.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Resources {
    vcpu: u32,
    memory_mb: u32,
    disk_mb: Option<u32>,
}

impl Resources {
    /// The size of a sandbox whose request names none: 1 vCPU, 512 MiB, the template's disk.
    pub const DEFAULT: Self = Self {
        vcpu: 1,
        memory_mb: 512,
        disk_mb: None,
    };

    /// Validated resources. `disk_mb` of `None` keeps the template's root filesystem size.
    pub fn new(vcpu: u32, memory_mb: u32, disk_mb: Option<u32>) -> Result<Self, CoreError> {
        check(&VCPU, vcpu, "resources.vcpu")?;
        check(&MEMORY_MB, memory_mb, "resources.memory_mb")?;
        if let Some(disk) = disk_mb {
            check(&DISK_MB, disk, "resources.disk_mb")?;
        }
        Ok(Self {
            vcpu,
            memory_mb,
            disk_mb,
        })
    }

    /// Virtual CPUs.
    pub fn vcpu(&self) -> u32 {
        self.vcpu
    }

    /// Guest memory in MiB.
    pub fn memory_mb(&self) -> u32 {
        self.memory_mb
    }

    /// Root disk size in MiB, or `None` for the template's own size.
    pub fn disk_mb(&self) -> Option<u32> {
        self.disk_mb
    }
}

impl Default for Resources {
    fn default() -> Self {
        Self::DEFAULT
    }
}

fn check(range: &RangeInclusive<u32>, value: u32, field: &'static str) -> Result<(), CoreError> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(CoreError::invalid(
            field,
            format!("{value} is outside {}..={}", range.start(), range.end()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_limits() {
        assert!(Resources::new(1, 64, None).is_ok());
        assert!(Resources::new(32, 65_536, Some(1_048_576)).is_ok());
        assert_eq!(Resources::default().vcpu(), 1);
        assert_eq!(Resources::default().memory_mb(), 512);
    }

    #[test]
    fn names_the_field_out_of_range() {
        let field = |r: Result<Resources, CoreError>| r.expect_err("invalid").field();
        assert_eq!(field(Resources::new(0, 512, None)), Some("resources.vcpu"));
        assert_eq!(field(Resources::new(33, 512, None)), Some("resources.vcpu"));
        assert_eq!(
            field(Resources::new(1, 63, None)),
            Some("resources.memory_mb")
        );
        assert_eq!(
            field(Resources::new(1, 65_537, None)),
            Some("resources.memory_mb")
        );
        assert_eq!(
            field(Resources::new(1, 512, Some(0))),
            Some("resources.disk_mb")
        );
    }
}
