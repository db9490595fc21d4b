//! A real DNS server on a loopback UDP port whose answers a test changes while ballast runs.
//! Messages are parsed and built with hickory-proto; only the answering policy is ours.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;
use tokio::task::AbortHandle;

/// What the server says for one name.
#[derive(Debug, Clone)]
pub enum Answer {
    /// These addresses (A for IPv4, AAAA for IPv6); an empty list is NOERROR with no data.
    Addrs(Vec<IpAddr>),
    NxDomain,
    ServFail,
}

pub struct DnsServer {
    pub addr: SocketAddr,
    answers: Arc<Mutex<HashMap<String, Answer>>>,
    queries: Arc<AtomicUsize>,
    task: AbortHandle,
}

impl DnsServer {
    /// Names without an answer set get NXDOMAIN.
    pub async fn start() -> DnsServer {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind dns");
        let addr = socket.local_addr().expect("local addr");
        let answers: Arc<Mutex<HashMap<String, Answer>>> = Arc::default();
        let queries = Arc::new(AtomicUsize::new(0));
        let (a, q) = (answers.clone(), queries.clone());
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                let Ok(request) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                q.fetch_add(1, Ordering::SeqCst);
                let reply = answer(&request, &a.lock().unwrap());
                if let Ok(bytes) = reply.to_vec() {
                    let _ = socket.send_to(&bytes, peer).await;
                }
            }
        })
        .abort_handle();
        DnsServer {
            addr,
            answers,
            queries,
            task,
        }
    }

    /// Sets the answer for `name` (without the trailing dot).
    pub fn set(&self, name: &str, answer: Answer) {
        self.answers
            .lock()
            .unwrap()
            .insert(name.to_ascii_lowercase(), answer);
    }

    pub fn set_addrs(&self, name: &str, addrs: &[SocketAddr]) {
        self.set(name, Answer::Addrs(addrs.iter().map(|a| a.ip()).collect()));
    }

    /// Queries received so far.
    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(request: &Message, answers: &HashMap<String, Answer>) -> Message {
    let mut reply = Message::new();
    reply
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(true);
    let Some(query) = request.queries().first() else {
        reply.set_response_code(ResponseCode::FormErr);
        return reply;
    };
    reply.add_query(query.clone());
    let name = query.name().to_ascii();
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    match answers.get(&name) {
        None | Some(Answer::NxDomain) => {
            reply.set_response_code(ResponseCode::NXDomain);
        }
        Some(Answer::ServFail) => {
            reply.set_response_code(ResponseCode::ServFail);
        }
        Some(Answer::Addrs(ips)) => {
            reply.set_response_code(ResponseCode::NoError);
            for ip in ips {
                let rdata = match (ip, query.query_type()) {
                    (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
                    (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
                    _ => continue,
                };
                // Docker's embedded DNS answers with a 600 s TTL: ballast must not trust it.
                reply.add_answer(Record::from_rdata(query.name().clone(), 600, rdata));
            }
        }
    }
    reply
}
