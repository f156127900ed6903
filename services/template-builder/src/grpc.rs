//! The gRPC edge: `nanobox.v1.Templates` over a [`Warmer`]. Requests are validated and
//! converted into domain types here; domain results are converted back; errors become
//! gRPC statuses with messages that name the problem.

use nanobox_core::TemplateState;
use nanobox_proto::convert;
use nanobox_proto::v1;
use nanobox_proto::v1::templates_server::Templates;
use nanobox_store::metadata::{Template, WarmupTask};
use nanobox_warmup::{TemplateView, Warmer, WarmupError};
use tonic::{Request, Response, Status};

/// The Templates service.
#[derive(Debug, Clone)]
pub struct TemplatesService {
    warmer: Warmer,
}

impl TemplatesService {
    pub fn new(warmer: Warmer) -> Self {
        Self { warmer }
    }
}

fn status(err: WarmupError) -> Status {
    let message = err.public_message();
    match err {
        WarmupError::InvalidArgument { .. } => Status::invalid_argument(message),
        WarmupError::NotFound(_) => Status::not_found(message),
        WarmupError::InUse { .. } => Status::failed_precondition(message),
        ref e if e.is_unavailable() => Status::unavailable(message),
        _ => Status::internal(message),
    }
}

fn timestamp(t: std::time::SystemTime) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp::from(t))
}

fn task_to_proto(task: WarmupTask) -> v1::WarmupTask {
    v1::WarmupTask {
        name: task.template.to_string(),
        image: task.image_ref,
        state: v1::TemplateState::from(task.state).into(),
        progress: Some(v1::WarmupProgress {
            layers_done: task.progress.layers_done,
            layers_total: task.progress.layers_total,
            bytes_done: task.progress.bytes_done,
            bytes_total: task.progress.bytes_total,
        }),
        message: task.message.unwrap_or_default(),
        digest: task.manifest_digest.unwrap_or_default(),
        created_at: timestamp(task.created_at),
        updated_at: timestamp(task.updated_at),
    }
}

fn view_to_proto(t: TemplateView) -> v1::Template {
    v1::Template {
        name: t.name.to_string(),
        image: t.image_ref,
        digest: t.manifest_digest.unwrap_or_default(),
        state: v1::TemplateState::from(t.state).into(),
        size_bytes: t.size_bytes.unwrap_or_default(),
        created_at: timestamp(t.created_at),
        config: Some(t.image_config.into()),
    }
}

fn template_to_proto(t: Template) -> v1::Template {
    view_to_proto(TemplateView::from(t))
}

#[tonic::async_trait]
impl Templates for TemplatesService {
    async fn warmup(
        &self,
        request: Request<v1::WarmupRequest>,
    ) -> Result<Response<v1::WarmupResponse>, Status> {
        let request = request.into_inner();
        let name = convert::template_name("name", request.name)?;
        if request.image.is_empty() {
            return Err(Status::invalid_argument("image: required"));
        }
        let task = self
            .warmer
            .submit(name, &request.image, &request.platform)
            .await
            .map_err(status)?;
        Ok(Response::new(v1::WarmupResponse {
            task: Some(task_to_proto(task)),
        }))
    }

    async fn list(
        &self,
        request: Request<v1::ListTemplatesRequest>,
    ) -> Result<Response<v1::ListTemplatesResponse>, Status> {
        let request = request.into_inner();
        let state: Option<TemplateState> = match request.state {
            0 => None,
            value => Some(convert::template_state(value)?),
        };
        let templates = self.warmer.list(state).await.map_err(status)?;
        Ok(Response::new(v1::ListTemplatesResponse {
            templates: templates.into_iter().map(view_to_proto).collect(),
        }))
    }

    async fn status(
        &self,
        request: Request<v1::GetTemplateStatusRequest>,
    ) -> Result<Response<v1::GetTemplateStatusResponse>, Status> {
        let name = convert::template_name("name", request.into_inner().name)?;
        let (task, template) = self.warmer.status(&name).await.map_err(status)?;
        Ok(Response::new(v1::GetTemplateStatusResponse {
            task: Some(task_to_proto(task)),
            template: template.map(template_to_proto),
        }))
    }

    async fn delete(
        &self,
        request: Request<v1::DeleteTemplateRequest>,
    ) -> Result<Response<v1::DeleteTemplateResponse>, Status> {
        let request = request.into_inner();
        let name = convert::template_name("name", request.name)?;
        self.warmer
            .delete(&name, request.force)
            .await
            .map_err(status)?;
        Ok(Response::new(v1::DeleteTemplateResponse {}))
    }
}
