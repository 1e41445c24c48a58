//! Connecting the CLI to a server: the URL, the credential file, and an admin
//! client that sends the credential with every call.

use std::path::PathBuf;

use anyhow::Context;
use flotilla_proto::pb::admin_service_client::AdminServiceClient;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::transport::Channel;

use crate::credential_file::CredentialFile;

/// Where and as whom to connect.
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// Server URL (https://host:port). Defaults to the credential file's, then https://127.0.0.1:7443.
    #[arg(long, global = true, env = "FLOTILLA_SERVER")]
    pub server: Option<String>,
    /// Operator credential file (written by `flotilla-server init` or `flotilla credential create`).
    #[arg(long, global = true, env = "FLOTILLA_CREDENTIAL")]
    pub credential: Option<PathBuf>,
}

/// Adds `authorization: Bearer <credential>` to each call.
#[derive(Clone)]
pub struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type Admin =
    AdminServiceClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

impl Target {
    pub fn credential_file(&self) -> anyhow::Result<CredentialFile> {
        let path = self
            .credential
            .as_ref()
            .context("no operator credential: pass --credential FILE or set FLOTILLA_CREDENTIAL")?;
        CredentialFile::load(path)
    }

    /// An admin client, connected.
    pub async fn admin(&self) -> anyhow::Result<(Admin, CredentialFile)> {
        let cred = self.credential_file()?;
        let url = self
            .server
            .clone()
            .or_else(|| cred.server.clone())
            .unwrap_or_else(|| "https://127.0.0.1:7443".to_string());
        let endpoint = flotilla_proto::tls::endpoint(&url, &cred.ca_certificate, None)?;
        let channel = endpoint
            .connect()
            .await
            .with_context(|| format!("cannot connect to the server at {url}"))?;
        let value: MetadataValue<_> = format!("Bearer {}", cred.credential)
            .parse()
            .context("the credential has characters that cannot be sent")?;
        let client = AdminServiceClient::with_interceptor(channel, Bearer(value))
            .max_decoding_message_size(flotilla_proto::limits::MAX_MESSAGE_BYTES);
        Ok((client, cred))
    }
}

/// Turns a gRPC status into an error that says what the server said.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", s.message(), s.code())
}
