//! Certificate renewal within a session: at two thirds of the certificate's life,
//! a new key and CSR, a RenewCertificate call over the mutual-TLS channel, and the
//! new key and certificate persisted (flushed) before they are used.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use flotilla_proto::pb;
use flotilla_proto::pb::agent_service_client::AgentServiceClient;
use flotilla_proto::tls;
use tonic::transport::Channel;

use super::{Agent, Outcome, RunError};
use crate::cert::{self, KeyAndCsr};
use crate::refusal::{self, Refusal};

/// How long one RenewCertificate call may take.
pub(super) const RENEW_TIMEOUT: Duration = Duration::from_secs(30);
/// Retry delays for a renewal that failed for a passing reason.
pub(super) const RENEW_RETRY_BASE: Duration = Duration::from_secs(5);
pub(super) const RENEW_RETRY_CAP: Duration = Duration::from_secs(300);
/// Longest single timer sleep: the renewal deadline is re-checked after it, which
/// also absorbs a wall clock that was set back.
pub(super) const MAX_TIMER: Duration = Duration::from_secs(30 * 24 * 3600);

/// Why a renewal did not complete.
pub(super) enum RenewFailure {
    Retry(String),
    Rejected(String),
}

pub(super) type RenewCall =
    Pin<Box<dyn Future<Output = Result<(KeyAndCsr, String), RenewFailure>> + Send>>;

/// Asks for a certificate on a fresh key.
pub(super) async fn request_renewal(
    mut client: AgentServiceClient<Channel>,
) -> Result<(KeyAndCsr, String), RenewFailure> {
    let key = cert::new_key_and_csr().map_err(|e| RenewFailure::Retry(e.to_string()))?;
    let mut request = tonic::Request::new(pb::RenewCertificateRequest {
        csr_der: key.csr_der.clone(),
    });
    request.set_timeout(RENEW_TIMEOUT);
    match tokio::time::timeout(RENEW_TIMEOUT, client.renew_certificate(request)).await {
        Err(_) => Err(RenewFailure::Retry(format!(
            "no answer within {RENEW_TIMEOUT:?}"
        ))),
        Ok(Err(status)) => match refusal::classify_status(&status) {
            Refusal::Refused(reason) => Err(RenewFailure::Rejected(reason)),
            Refusal::Transient(reason) => Err(RenewFailure::Retry(reason)),
        },
        Ok(Ok(response)) => Ok((key, response.into_inner().certificate_pem)),
    }
}

impl Agent {
    /// Renews a certificate that expired while the agent was stopped, with
    /// `url`'s server: no client certificate (it would be refused), a proof
    /// of the node's key instead. `Renewed` on success.
    pub(super) async fn reenroll(&mut self, url: &str) -> Outcome {
        tracing::info!(not_after = self.cert.not_after, %url, "the node certificate expired while the agent was stopped; renewing it with the node's key");
        let endpoint = match tls::endpoint(url, &self.node.ca_pem, None) {
            Ok(e) => e,
            Err(e) => return Outcome::Fatal(e.into()),
        };
        let channel = match endpoint.connect().await {
            Ok(c) => c,
            Err(e) => return refusal::classify_error(&e).prefixed(url).into(),
        };
        let key = match cert::new_key_and_csr() {
            Ok(k) => k,
            Err(e) => return Outcome::Failed(e.to_string()),
        };
        let proof = match cert::prove_key(
            &self.node,
            flotilla_proto::key_proof::REENROLL,
            &key.csr_der,
        ) {
            Ok(p) => p,
            Err(e) => return Outcome::Failed(format!("cannot sign with the node's key: {e}")),
        };
        let mut request = tonic::Request::new(pb::ReenrollRequest {
            csr_der: key.csr_der.clone(),
            proof: Some(proof),
        });
        request.set_timeout(RENEW_TIMEOUT);
        let mut client = AgentServiceClient::new(channel);
        let answer = match tokio::time::timeout(RENEW_TIMEOUT, client.reenroll(request)).await {
            Err(_) => return Outcome::Failed(format!("{url}: no answer within {RENEW_TIMEOUT:?}")),
            Ok(Err(status)) => return refusal::classify_status(&status).prefixed(url).into(),
            Ok(Ok(a)) => a.into_inner(),
        };
        match self.adopt_certificate(key, answer.certificate_pem) {
            Ok(()) => Outcome::Renewed,
            Err(AdoptError::Fatal(e)) => Outcome::Fatal(e),
            Err(AdoptError::Unusable(reason)) => Outcome::Failed(reason),
        }
    }

    /// Time until the renewal deadline (capped; see [`MAX_TIMER`]).
    pub(super) fn until_renewal(&self) -> Duration {
        cert::until(self.cert.renew_at(), cert::unix_now()).min(MAX_TIMER)
    }

    /// Checks and stores a renewed certificate with its key.
    pub(super) fn adopt_certificate(
        &mut self,
        key: KeyAndCsr,
        cert_pem: String,
    ) -> Result<(), AdoptError> {
        let info = cert::cert_info(&cert_pem).map_err(|e| AdoptError::Unusable(e.to_string()))?;
        info.check_key(&key.public_key)
            .map_err(|e| AdoptError::Unusable(e.to_string()))?;
        if info.not_after <= cert::unix_now() {
            return Err(AdoptError::Unusable(
                "the server issued a certificate that has already expired".into(),
            ));
        }
        let mut node = self.node.clone();
        node.key_pem = key.key_pem;
        node.cert_pem = cert_pem;
        node.renewals += 1;
        // Flushed before the new certificate is used.
        self.store
            .save_identity(&node)
            .map_err(|e| AdoptError::Fatal(e.into()))?;
        tracing::info!(serial = %info.serial_hex, not_after = info.not_after, renewals = node.renewals, "node certificate renewed");
        self.node = node;
        self.cert = info;
        self.publish_status();
        Ok(())
    }
}

/// Why a renewed certificate was not adopted.
pub(super) enum AdoptError {
    /// The answer is unusable; keep the old certificate and retry later.
    Unusable(String),
    /// It could not be stored.
    Fatal(RunError),
}
