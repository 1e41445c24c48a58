//! What `grpcurl` and load balancers ask the server, over its TLS and
//! without a credential: reflection lists every service and describes each,
//! and health answers for the server and each service.

use flotilla_e2e::Server;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

async fn ask(
    client: &mut ServerReflectionClient<tonic::transport::Channel>,
    request: MessageRequest,
) -> MessageResponse {
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    };
    let mut answers = client
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let answer: ServerReflectionResponse = answers.message().await.unwrap().expect("an answer");
    answer.message_response.expect("a response")
}

#[test]
fn reflection_describes_every_service_and_health_answers_for_each() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::init(dir.path());
    server.start();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel = flotilla_proto::tls::endpoint(&server.url(), &server.ca_pem(), None)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut reflection = ServerReflectionClient::new(channel.clone());
        let MessageResponse::ListServicesResponse(list) =
            ask(&mut reflection, MessageRequest::ListServices(String::new())).await
        else {
            panic!("not a service list");
        };
        let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
        for wanted in [
            "flotilla.v1.AgentService",
            "flotilla.v1.AdminService",
            "flotilla.v1.ReplicaService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
        ] {
            assert!(names.contains(&wanted), "{wanted} in {names:?}");
        }
        assert!(
            !names.contains(&"flotilla.v1.SiteService"),
            "agents serve that, not the server: {names:?}"
        );
        let MessageResponse::FileDescriptorResponse(files) = ask(
            &mut reflection,
            MessageRequest::FileContainingSymbol("flotilla.v1.AdminService".into()),
        )
        .await
        else {
            panic!("not a file descriptor");
        };
        let described = files
            .file_descriptor_proto
            .iter()
            .any(|f| f.windows(12).any(|w| w == b"PublishPatch"));
        assert!(described, "the admin service's methods are described");
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        for service in ["", "flotilla.v1.AgentService", "flotilla.v1.AdminService"] {
            let status = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status;
            assert_eq!(
                status,
                tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
                "{service:?}"
            );
        }
    });
}
