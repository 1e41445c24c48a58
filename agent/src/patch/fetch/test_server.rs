//! A tiny in-process AgentService (plain HTTP/2, no TLS, on 127.0.0.1) that serves
//! FetchArtifact from a byte vector, with knobs to misbehave: cut streams short,
//! corrupt a byte, send extra bytes, trickle, or send nothing at all.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_proto::pb;
use flotilla_proto::pb::agent_service_client::AgentServiceClient;
use flotilla_proto::pb::agent_service_server::{AgentService, AgentServiceServer};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Endpoint, Server};
use tonic::{Request, Response, Status, Streaming};

use super::ClientSource;

/// How a fake server behaves.
#[derive(Clone, Default)]
pub struct Knobs {
    /// The artifact.
    pub data: Vec<u8>,
    /// Bytes per chunk (default 1000).
    pub chunk: usize,
    /// End the stream (cleanly) once this absolute position is reached, for the
    /// first `.1` requests.
    pub cut: Option<(u64, usize)>,
    /// Flip this byte.
    pub corrupt: Option<usize>,
    /// Send this many bytes beyond the artifact.
    pub extra: usize,
    /// Wait this long before each chunk.
    pub trickle: Option<Duration>,
    /// Open the stream but never send anything.
    pub silent: bool,
    /// Answer every request with this error.
    pub refuse: Option<tonic::Code>,
}

/// One fake server and what it was asked.
pub struct Fake {
    knobs: Knobs,
    sha256: String,
    cuts_left: Mutex<usize>,
    /// Offsets of the requests received, in order.
    pub requests: Mutex<Vec<u64>>,
    pub url: String,
}

impl Fake {
    pub fn requests(&self) -> Vec<u64> {
        self.requests.lock().unwrap().clone()
    }
}

#[derive(Clone)]
struct Service(Arc<Fake>);

type Boxed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for Service {
    async fn enroll(
        &self,
        _: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        Err(Status::unimplemented("test server"))
    }

    type SessionStream = Boxed<pb::ServerMessage>;

    async fn session(
        &self,
        _: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        Err(Status::unimplemented("test server"))
    }

    async fn renew_certificate(
        &self,
        _: Request<pb::RenewCertificateRequest>,
    ) -> Result<Response<pb::RenewCertificateResponse>, Status> {
        Err(Status::unimplemented("test server"))
    }

    async fn reenroll(
        &self,
        _: Request<pb::ReenrollRequest>,
    ) -> Result<Response<pb::RenewCertificateResponse>, Status> {
        Err(Status::unimplemented("test server"))
    }

    async fn report(
        &self,
        _: Request<pb::ReportRequest>,
    ) -> Result<Response<pb::ReportResponse>, Status> {
        Err(Status::unimplemented("test server"))
    }

    async fn authorize_site_peer(
        &self,
        _: Request<pb::AuthorizeSitePeerRequest>,
    ) -> Result<Response<pb::AuthorizeSitePeerResponse>, Status> {
        Err(Status::unimplemented("test server"))
    }

    type FetchArtifactStream = Boxed<pb::ArtifactChunk>;

    async fn fetch_artifact(
        &self,
        request: Request<pb::FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        let req = request.into_inner();
        let fake = self.0.clone();
        fake.requests.lock().unwrap().push(req.offset);
        if let Some(code) = fake.knobs.refuse {
            return Err(Status::new(code, "refused by the test server"));
        }
        if req.sha256 != fake.sha256 {
            return Err(Status::not_found(format!("no artifact {}", req.sha256)));
        }
        let mut body = fake.knobs.data.clone();
        if let Some(i) = fake.knobs.corrupt {
            body[i] ^= 0xff;
        }
        body.extend(std::iter::repeat_n(0x5a, fake.knobs.extra));
        let mut end = body.len() as u64;
        if let Some((at, _)) = fake.knobs.cut {
            let mut left = fake.cuts_left.lock().unwrap();
            if *left > 0 {
                *left -= 1;
                end = end.min(at);
            }
        }
        let chunk = if fake.knobs.chunk == 0 {
            1000
        } else {
            fake.knobs.chunk
        };
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            if fake.knobs.silent {
                tx.closed().await;
                return;
            }
            let mut at = req.offset;
            while at < end {
                if let Some(delay) = fake.knobs.trickle {
                    tokio::time::sleep(delay).await;
                }
                let stop = end.min(at + chunk as u64);
                let data = body[at as usize..stop as usize].to_vec();
                if tx
                    .send(Ok(pb::ArtifactChunk {
                        offset: at,
                        data: data.into(),
                    }))
                    .await
                    .is_err()
                {
                    return;
                }
                at = stop;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Starts a fake server with `knobs` on 127.0.0.1 (an ephemeral port).
pub async fn serve(knobs: Knobs) -> Arc<Fake> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let fake = Arc::new(Fake {
        sha256: flotilla_proto::sha256_hex(&knobs.data),
        cuts_left: Mutex::new(knobs.cut.map_or(0, |c| c.1)),
        knobs,
        requests: Mutex::new(Vec::new()),
        url,
    });
    let service = AgentServiceServer::new(Service(fake.clone()));
    tokio::spawn(
        Server::builder()
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    fake
}

/// An [`ClientSource`] over plain clients of `fakes`, in order.
pub fn source(fakes: &[&Arc<Fake>]) -> ClientSource {
    ClientSource::new(
        fakes
            .iter()
            .map(|f| {
                let channel = Endpoint::from_shared(f.url.clone()).unwrap().connect_lazy();
                (f.url.clone(), AgentServiceClient::new(channel))
            })
            .collect(),
    )
}
