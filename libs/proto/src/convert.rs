//! Conversions between the wire types and the `nanobox-core` domain types.
//!
//! Wire to domain is `TryFrom` and validates: a bad value fails with a [`ConvertError`] that
//! names the field as the API spells it, and turns into an `INVALID_ARGUMENT` status. Domain
//! to wire is `From` and cannot fail. Zero values follow the proto docs: a zero resource
//! field takes the default, a zero timeout means "none set", an unspecified network mode is
//! isolated.

use std::time::Duration;

use nanobox_core::{
    CoreError, ExecSpec, ExitKind, ExitOutcome, ImageConfig, NetworkMode, NetworkSpec, NodeState,
    Resources, SandboxId, SandboxSpec, SandboxState, TemplateName, TemplateState,
};

use crate::v1;

/// Why a wire message could not become a domain value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// A required field is not set.
    #[error("missing {field}")]
    Missing {
        /// The field.
        field: &'static str,
    },
    /// An enum field holds a number the contract does not define.
    #[error("invalid {field}: unknown value {value}")]
    UnknownEnum {
        /// The field.
        field: &'static str,
        /// The number received.
        value: i32,
    },
    /// The value breaks a domain rule.
    #[error(transparent)]
    Invalid(#[from] CoreError),
}

impl ConvertError {
    /// The field the error is about, as the API names it.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Self::Missing { field } | Self::UnknownEnum { field, .. } => Some(field),
            Self::Invalid(err) => err.field(),
        }
    }
}

impl From<ConvertError> for tonic::Status {
    fn from(err: ConvertError) -> Self {
        tonic::Status::invalid_argument(err.to_string())
    }
}

/// Decodes an enum field, rejecting numbers the contract does not define.
fn enum_field<E: TryFrom<i32>>(field: &'static str, value: i32) -> Result<E, ConvertError> {
    E::try_from(value).map_err(|_| ConvertError::UnknownEnum { field, value })
}

/// `None` for the empty string, which proto3 uses for "not set".
fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// Parses a sandbox id field.
pub fn sandbox_id(field: &'static str, id: &str) -> Result<SandboxId, ConvertError> {
    SandboxId::parse(id).map_err(|err| match err {
        CoreError::Invalid { reason, .. } => CoreError::Invalid { field, reason }.into(),
        other => other.into(),
    })
}

/// Parses a template name field.
pub fn template_name(field: &'static str, name: String) -> Result<TemplateName, ConvertError> {
    if name.is_empty() {
        return Err(ConvertError::Missing { field });
    }
    TemplateName::new(name).map_err(|err| match err {
        CoreError::Invalid { reason, .. } => CoreError::Invalid { field, reason }.into(),
        other => other.into(),
    })
}

// Resources.

impl TryFrom<v1::Resources> for Resources {
    type Error = ConvertError;

    /// Zero fields take the defaults of [`Resources::DEFAULT`].
    fn try_from(r: v1::Resources) -> Result<Self, Self::Error> {
        let default = Resources::DEFAULT;
        let or_default = |v: u32, d: u32| if v == 0 { d } else { v };
        Ok(Resources::new(
            or_default(r.vcpu, default.vcpu()),
            or_default(r.memory_mb, default.memory_mb()),
            (r.disk_mb != 0).then_some(r.disk_mb),
        )?)
    }
}

impl From<Resources> for v1::Resources {
    fn from(r: Resources) -> Self {
        Self {
            vcpu: r.vcpu(),
            memory_mb: r.memory_mb(),
            disk_mb: r.disk_mb().unwrap_or(0),
        }
    }
}

/// Resources from an optional message: unset means all defaults.
pub fn resources_or_default(r: Option<v1::Resources>) -> Result<Resources, ConvertError> {
    r.map_or(Ok(Resources::DEFAULT), Resources::try_from)
}

// Network.

impl From<v1::NetworkMode> for NetworkMode {
    /// Unspecified means isolated, the safe default.
    fn from(mode: v1::NetworkMode) -> Self {
        match mode {
            v1::NetworkMode::Unspecified | v1::NetworkMode::Isolated => NetworkMode::Isolated,
            v1::NetworkMode::Internal => NetworkMode::Internal,
            v1::NetworkMode::Internet => NetworkMode::Internet,
        }
    }
}

impl From<NetworkMode> for v1::NetworkMode {
    fn from(mode: NetworkMode) -> Self {
        match mode {
            NetworkMode::Isolated => Self::Isolated,
            NetworkMode::Internal => Self::Internal,
            NetworkMode::Internet => Self::Internet,
        }
    }
}

impl TryFrom<v1::NetworkSpec> for NetworkSpec {
    type Error = ConvertError;

    fn try_from(n: v1::NetworkSpec) -> Result<Self, Self::Error> {
        let mode: v1::NetworkMode = enum_field("network.mode", n.mode)?;
        Ok(NetworkSpec::new(
            mode.into(),
            (n.egress_rate_bps != 0).then_some(n.egress_rate_bps),
            non_empty(n.tenant_scope),
        )?)
    }
}

impl From<NetworkSpec> for v1::NetworkSpec {
    fn from(n: NetworkSpec) -> Self {
        Self {
            mode: v1::NetworkMode::from(n.mode()).into(),
            egress_rate_bps: n.egress_rate_bps().unwrap_or(0),
            tenant_scope: n.tenant_scope().unwrap_or_default().to_owned(),
        }
    }
}

/// A network from an optional message: unset means isolated.
pub fn network_or_default(n: Option<v1::NetworkSpec>) -> Result<NetworkSpec, ConvertError> {
    n.map_or(Ok(NetworkSpec::isolated()), NetworkSpec::try_from)
}

// States.

impl TryFrom<v1::SandboxState> for SandboxState {
    type Error = ConvertError;

    fn try_from(state: v1::SandboxState) -> Result<Self, Self::Error> {
        Ok(match state {
            v1::SandboxState::Unspecified => return Err(ConvertError::Missing { field: "state" }),
            v1::SandboxState::Pending => Self::Pending,
            v1::SandboxState::Starting => Self::Starting,
            v1::SandboxState::Running => Self::Running,
            v1::SandboxState::Paused => Self::Paused,
            v1::SandboxState::Stopping => Self::Stopping,
            v1::SandboxState::Stopped => Self::Stopped,
            v1::SandboxState::Failed => Self::Failed,
            v1::SandboxState::Lost => Self::Lost,
        })
    }
}

impl From<SandboxState> for v1::SandboxState {
    fn from(state: SandboxState) -> Self {
        match state {
            SandboxState::Pending => Self::Pending,
            SandboxState::Starting => Self::Starting,
            SandboxState::Running => Self::Running,
            SandboxState::Paused => Self::Paused,
            SandboxState::Stopping => Self::Stopping,
            SandboxState::Stopped => Self::Stopped,
            SandboxState::Failed => Self::Failed,
            SandboxState::Lost => Self::Lost,
        }
    }
}

/// Decodes a sandbox state field (`Sandbox.state`), which must be set.
pub fn sandbox_state(value: i32) -> Result<SandboxState, ConvertError> {
    enum_field::<v1::SandboxState>("state", value)?.try_into()
}

impl TryFrom<v1::TemplateState> for TemplateState {
    type Error = ConvertError;

    fn try_from(state: v1::TemplateState) -> Result<Self, Self::Error> {
        Ok(match state {
            v1::TemplateState::Unspecified => return Err(ConvertError::Missing { field: "state" }),
            v1::TemplateState::Queued => Self::Queued,
            v1::TemplateState::Pulling => Self::Pulling,
            v1::TemplateState::Extracting => Self::Extracting,
            v1::TemplateState::Building => Self::Building,
            v1::TemplateState::Uploading => Self::Uploading,
            v1::TemplateState::Ready => Self::Ready,
            v1::TemplateState::Failed => Self::Failed,
        })
    }
}

impl From<TemplateState> for v1::TemplateState {
    fn from(state: TemplateState) -> Self {
        match state {
            TemplateState::Queued => Self::Queued,
            TemplateState::Pulling => Self::Pulling,
            TemplateState::Extracting => Self::Extracting,
            TemplateState::Building => Self::Building,
            TemplateState::Uploading => Self::Uploading,
            TemplateState::Ready => Self::Ready,
            TemplateState::Failed => Self::Failed,
        }
    }
}

/// Decodes a template state field, which must be set.
pub fn template_state(value: i32) -> Result<TemplateState, ConvertError> {
    enum_field::<v1::TemplateState>("state", value)?.try_into()
}

impl TryFrom<v1::NodeState> for NodeState {
    type Error = ConvertError;

    fn try_from(state: v1::NodeState) -> Result<Self, Self::Error> {
        Ok(match state {
            v1::NodeState::Unspecified => return Err(ConvertError::Missing { field: "state" }),
            v1::NodeState::Ready => Self::Ready,
            v1::NodeState::Draining => Self::Draining,
            v1::NodeState::Lost => Self::Lost,
        })
    }
}

impl From<NodeState> for v1::NodeState {
    fn from(state: NodeState) -> Self {
        match state {
            NodeState::Ready => Self::Ready,
            NodeState::Draining => Self::Draining,
            NodeState::Lost => Self::Lost,
        }
    }
}

// Templates.

impl TryFrom<v1::ImageConfig> for ImageConfig {
    type Error = ConvertError;

    fn try_from(c: v1::ImageConfig) -> Result<Self, Self::Error> {
        let config = ImageConfig {
            env: c.env,
            working_dir: c.working_dir,
            user: c.user,
            entrypoint: c.entrypoint,
            cmd: c.cmd,
        };
        config.validate()?;
        Ok(config)
    }
}

impl From<ImageConfig> for v1::ImageConfig {
    fn from(c: ImageConfig) -> Self {
        Self {
            env: c.env,
            working_dir: c.working_dir,
            user: c.user,
            entrypoint: c.entrypoint,
            cmd: c.cmd,
        }
    }
}

// Sandboxes.

impl TryFrom<v1::CreateSandboxRequest> for SandboxSpec {
    type Error = ConvertError;

    /// The idempotency key `request_id` is not part of the spec; read it from the request.
    fn try_from(r: v1::CreateSandboxRequest) -> Result<Self, Self::Error> {
        let spec = SandboxSpec {
            template: template_name("template", r.template)?,
            resources: resources_or_default(r.resources)?,
            network: network_or_default(r.network)?,
            env: r.env.into_iter().collect(),
            timeout: (r.timeout_sec != 0).then(|| Duration::from_secs(r.timeout_sec.into())),
            metadata: r.metadata.into_iter().collect(),
        };
        spec.validate()?;
        Ok(spec)
    }
}

impl From<SandboxSpec> for v1::CreateSandboxRequest {
    fn from(spec: SandboxSpec) -> Self {
        Self {
            template: spec.template.to_string(),
            resources: Some(spec.resources.into()),
            network: Some(spec.network.into()),
            env: spec.env.into_iter().collect(),
            timeout_sec: spec.timeout.map_or(0, duration_secs),
            metadata: spec.metadata.into_iter().collect(),
            request_id: String::new(),
        }
    }
}

// Exec.

impl TryFrom<v1::ExecRequest> for ExecSpec {
    type Error = ConvertError;

    /// The sandbox `id` is not part of the spec; parse it with [`sandbox_id`].
    fn try_from(r: v1::ExecRequest) -> Result<Self, Self::Error> {
        let spec = ExecSpec {
            command: r.command,
            args: r.args,
            env: r.env.into_iter().collect(),
            cwd: non_empty(r.cwd),
            uid: r.uid,
            gid: r.gid,
            timeout: (r.timeout_ms != 0).then(|| Duration::from_millis(r.timeout_ms.into())),
            stdin: r.stdin,
        };
        spec.validate()?;
        Ok(spec)
    }
}

/// The request that runs `spec` in sandbox `id`.
pub fn exec_request(id: &SandboxId, spec: ExecSpec) -> v1::ExecRequest {
    v1::ExecRequest {
        id: id.to_string(),
        command: spec.command,
        args: spec.args,
        env: spec.env.into_iter().collect(),
        cwd: spec.cwd.unwrap_or_default(),
        uid: spec.uid,
        gid: spec.gid,
        timeout_ms: spec
            .timeout
            .map_or(0, |t| u32::try_from(t.as_millis()).unwrap_or(u32::MAX)),
        stdin: spec.stdin,
    }
}

impl TryFrom<v1::ExecResult> for ExitOutcome {
    type Error = ConvertError;

    /// A non-zero `signal` wins over `exit_code`, which then holds the shell's 128 + signal.
    fn try_from(r: v1::ExecResult) -> Result<Self, Self::Error> {
        let kind = match r.signal {
            0 => ExitKind::Code(r.exit_code),
            1..=64 => ExitKind::Signal(r.signal),
            _ => {
                return Err(
                    CoreError::invalid("signal", format!("{} is not a signal", r.signal)).into(),
                )
            }
        };
        Ok(ExitOutcome {
            kind,
            timed_out: r.timed_out,
            duration: Duration::from_millis(r.duration_ms),
        })
    }
}

impl From<ExitOutcome> for v1::ExecResult {
    fn from(o: ExitOutcome) -> Self {
        Self {
            exit_code: o.kind.shell_code(),
            signal: match o.kind {
                ExitKind::Code(_) => 0,
                ExitKind::Signal(signal) => signal,
            },
            timed_out: o.timed_out,
            duration_ms: u64::try_from(o.duration.as_millis()).unwrap_or(u64::MAX),
        }
    }
}

/// Whole seconds, saturating at `u32::MAX`.
fn duration_secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full_spec() -> SandboxSpec {
        let mut spec = SandboxSpec::new(TemplateName::new("node22").unwrap());
        spec.resources = Resources::new(2, 1024, Some(4096)).unwrap();
        spec.network = NetworkSpec::new(
            NetworkMode::Internet,
            Some(1_000_000),
            Some("tenant-a".into()),
        )
        .unwrap();
        spec.env.insert("NODE_ENV".into(), "production".into());
        spec.timeout = Some(Duration::from_secs(600));
        spec.metadata.insert("owner".into(), "abox".into());
        spec
    }

    #[test]
    fn sandbox_spec_round_trips() {
        for spec in [
            full_spec(),
            SandboxSpec::new(TemplateName::new("a").unwrap()),
        ] {
            let wire = v1::CreateSandboxRequest::from(spec.clone());
            assert_eq!(SandboxSpec::try_from(wire), Ok(spec));
        }
    }

    #[test]
    fn minimal_create_request_takes_defaults() {
        let spec = SandboxSpec::try_from(v1::CreateSandboxRequest {
            template: "node22".into(),
            resources: Some(v1::Resources {
                vcpu: 2,
                ..Default::default()
            }),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(spec.resources.vcpu(), 2);
        assert_eq!(spec.resources.memory_mb(), Resources::DEFAULT.memory_mb());
        assert_eq!(spec.resources.disk_mb(), None);
        assert_eq!(spec.network, NetworkSpec::isolated());
        assert_eq!(spec.timeout, None);
    }

    #[test]
    fn create_request_errors_name_the_field() {
        let field = |r: v1::CreateSandboxRequest| SandboxSpec::try_from(r).unwrap_err().field();
        let base = || v1::CreateSandboxRequest {
            template: "node22".into(),
            ..Default::default()
        };

        assert_eq!(field(v1::CreateSandboxRequest::default()), Some("template"));
        assert_eq!(
            field(v1::CreateSandboxRequest {
                template: "Node22".into(),
                ..base()
            }),
            Some("template")
        );
        assert_eq!(
            field(v1::CreateSandboxRequest {
                resources: Some(v1::Resources {
                    vcpu: 33,
                    ..Default::default()
                }),
                ..base()
            }),
            Some("resources.vcpu")
        );
        assert_eq!(
            field(v1::CreateSandboxRequest {
                network: Some(v1::NetworkSpec {
                    mode: 99,
                    ..Default::default()
                }),
                ..base()
            }),
            Some("network.mode")
        );
        assert_eq!(
            field(v1::CreateSandboxRequest {
                network: Some(v1::NetworkSpec {
                    mode: v1::NetworkMode::Isolated.into(),
                    egress_rate_bps: 10,
                    ..Default::default()
                }),
                ..base()
            }),
            Some("network.egress_rate_bps")
        );
        assert_eq!(
            field(v1::CreateSandboxRequest {
                timeout_sec: 86_401,
                ..base()
            }),
            Some("timeout_sec")
        );

        let status = tonic::Status::from(
            SandboxSpec::try_from(v1::CreateSandboxRequest::default()).unwrap_err(),
        );
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(status.message(), "missing template");
    }

    #[test]
    fn states_round_trip_and_unspecified_is_rejected() {
        for state in SandboxState::ALL {
            let wire = v1::SandboxState::from(state);
            assert_eq!(SandboxState::try_from(wire), Ok(state));
            assert_eq!(sandbox_state(wire.into()), Ok(state));
            assert_eq!(wire.as_str_name(), format!("SANDBOX_STATE_{state}"));
        }
        assert_eq!(sandbox_state(0).unwrap_err().field(), Some("state"));
        assert_eq!(
            sandbox_state(42),
            Err(ConvertError::UnknownEnum {
                field: "state",
                value: 42
            })
        );

        for state in [
            TemplateState::Queued,
            TemplateState::Pulling,
            TemplateState::Extracting,
            TemplateState::Building,
            TemplateState::Uploading,
            TemplateState::Ready,
            TemplateState::Failed,
        ] {
            let wire = v1::TemplateState::from(state);
            assert_eq!(template_state(wire.into()), Ok(state));
            assert_eq!(wire.as_str_name(), format!("TEMPLATE_STATE_{state}"));
        }
        assert!(template_state(0).is_err());

        for state in [NodeState::Ready, NodeState::Draining, NodeState::Lost] {
            assert_eq!(NodeState::try_from(v1::NodeState::from(state)), Ok(state));
        }
        assert!(NodeState::try_from(v1::NodeState::Unspecified).is_err());
    }

    #[test]
    fn network_modes() {
        for mode in [
            NetworkMode::Isolated,
            NetworkMode::Internal,
            NetworkMode::Internet,
        ] {
            assert_eq!(NetworkMode::from(v1::NetworkMode::from(mode)), mode);
        }
        assert_eq!(
            NetworkMode::from(v1::NetworkMode::Unspecified),
            NetworkMode::Isolated
        );
        assert_eq!(network_or_default(None), Ok(NetworkSpec::isolated()));
    }

    #[test]
    fn exec_spec_round_trips_and_validates() {
        let id = SandboxId::new();
        let mut spec = ExecSpec::new("node", ["-e", "console.log(1)"]);
        spec.env.insert("A".into(), "1".into());
        spec.cwd = Some("/work".into());
        spec.uid = Some(1000);
        spec.gid = Some(0);
        spec.timeout = Some(Duration::from_millis(1500));
        spec.stdin = b"input".to_vec();

        let wire = exec_request(&id, spec.clone());
        assert_eq!(sandbox_id("id", &wire.id), Ok(id));
        assert_eq!(ExecSpec::try_from(wire), Ok(spec));

        let empty = v1::ExecRequest::default();
        assert_eq!(
            ExecSpec::try_from(empty).unwrap_err().field(),
            Some("command")
        );
        assert_eq!(sandbox_id("id", "nope").unwrap_err().field(), Some("id"));
    }

    #[test]
    fn exit_outcomes_round_trip() {
        for kind in [ExitKind::Code(0), ExitKind::Code(2), ExitKind::Signal(9)] {
            let outcome = ExitOutcome {
                kind,
                timed_out: matches!(kind, ExitKind::Signal(_)),
                duration: Duration::from_millis(1234),
            };
            let wire = v1::ExecResult::from(outcome);
            assert_eq!(ExitOutcome::try_from(wire), Ok(outcome));
        }
        let killed = v1::ExecResult::from(ExitOutcome {
            kind: ExitKind::Signal(15),
            timed_out: false,
            duration: Duration::ZERO,
        });
        assert_eq!((killed.exit_code, killed.signal), (143, 15));

        let bad = v1::ExecResult {
            signal: -1,
            ..Default::default()
        };
        assert_eq!(
            ExitOutcome::try_from(bad).unwrap_err().field(),
            Some("signal")
        );
    }

    #[test]
    fn resources_and_image_config() {
        let r = Resources::new(4, 2048, None).unwrap();
        assert_eq!(Resources::try_from(v1::Resources::from(r)), Ok(r));
        assert_eq!(resources_or_default(None), Ok(Resources::DEFAULT));
        assert_eq!(
            Resources::try_from(v1::Resources {
                memory_mb: 32,
                ..Default::default()
            })
            .unwrap_err()
            .field(),
            Some("resources.memory_mb")
        );

        let config = ImageConfig {
            env: vec!["PATH=/bin".into()],
            working_dir: "/app".into(),
            user: "node".into(),
            entrypoint: vec!["docker-entrypoint.sh".into()],
            cmd: vec!["node".into()],
        };
        assert_eq!(
            ImageConfig::try_from(v1::ImageConfig::from(config.clone())),
            Ok(config)
        );
        let bad = v1::ImageConfig {
            env: vec!["=x".into()],
            ..Default::default()
        };
        assert_eq!(
            ImageConfig::try_from(bad).unwrap_err().field(),
            Some("config.env")
        );
    }

    #[test]
    fn descriptor_set_holds_every_service_and_the_http_rules() {
        use prost::Message;
        let fds = prost_types::FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET).unwrap();
        let services: Vec<String> = fds
            .file
            .iter()
            .flat_map(|f| {
                f.service
                    .iter()
                    .map(move |s| format!("{}.{}", f.package(), s.name()))
            })
            .collect();
        for expected in [
            "nanobox.v1.Sandboxes",
            "nanobox.v1.Templates",
            "nanobox.v1.Cluster",
            "nanobox.node.v1.NodeAgent",
            "nanobox.node.v1.NodeRegistry",
            "nanobox.snapshot.v1.SnapshotStore",
        ] {
            assert!(
                services.iter().any(|s| s == expected),
                "{expected} in {services:?}"
            );
        }
        assert!(fds
            .file
            .iter()
            .any(|f| f.name() == "google/protobuf/timestamp.proto"));
        // The google.api.http options (field 72295728) are in the encoded set.
        for path in [
            "/api/v1/sandboxes/{id}/exec",
            "/api/v1/templates/{name}/status",
            "/api/v1/stats",
        ] {
            let needle = path.as_bytes();
            assert!(
                crate::FILE_DESCRIPTOR_SET
                    .windows(needle.len())
                    .any(|w| w == needle),
                "{path}"
            );
        }
    }

    #[test]
    fn reflection_services_build() {
        let served = ["nanobox.v1.Templates", "nanobox.node.v1.NodeAgent"];
        assert!(crate::reflection(&served).build_v1().is_ok());
        assert!(crate::reflection(&served).build_v1alpha().is_ok());
    }
}
