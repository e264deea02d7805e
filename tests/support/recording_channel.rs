//! A chat channel that records what signoff asks of it. Registered with one line, it gets
//! cards, updates and reminders through the same delivery path as Slack: the proof that a
//! chat platform is a folder under channels/ plus its registration.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde_json::{json, Value};
use signoff::channels::{CardSync, CardView, ChannelError, ChatChannel, Reminder};
use signoff::domain::{ApprovalRequest, Destination, Status, Voter};
use signoff::engine::Engine;

/// One thing signoff asked the channel to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Recorded {
    Posted {
        destination: String,
        request_id: String,
        revision: u32,
        status: Status,
    },
    Updated {
        destination: String,
        request_id: String,
        revision: u32,
        status: Status,
    },
    Reminded {
        destination: String,
        approvals: u64,
        required: u64,
    },
}

pub struct RecordingChannel {
    platform: &'static str,
    recorded: Mutex<Vec<Recorded>>,
}

impl RecordingChannel {
    pub fn new(platform: &'static str) -> Arc<Self> {
        Arc::new(Self {
            platform,
            recorded: Mutex::new(Vec::new()),
        })
    }

    pub fn recorded(&self) -> Vec<Recorded> {
        self.recorded.lock().unwrap().clone()
    }
}

#[async_trait]
impl ChatChannel for RecordingChannel {
    fn platform(&self) -> &'static str {
        self.platform
    }

    async fn sync_card(
        &self,
        request: &CardView,
        destination: &Destination,
        posted: Option<&Value>,
    ) -> Result<CardSync, ChannelError> {
        let (destination, request_id) = (destination.to_string(), request.id.clone());
        let (revision, status) = (request.revision, request.status);
        let mut recorded = self.recorded.lock().unwrap();
        match posted {
            Some(_) => {
                recorded.push(Recorded::Updated {
                    destination,
                    request_id,
                    revision,
                    status,
                });
                Ok(CardSync::Updated)
            }
            None => {
                let reference = json!({"message": recorded.len()});
                recorded.push(Recorded::Posted {
                    destination,
                    request_id,
                    revision,
                    status,
                });
                Ok(CardSync::Posted { reference })
            }
        }
    }

    async fn post_reminder(
        &self,
        reminder: &Reminder,
        destination: &Destination,
        _posted: &Value,
    ) -> Result<(), ChannelError> {
        self.recorded.lock().unwrap().push(Recorded::Reminded {
            destination: destination.to_string(),
            approvals: reminder.approvals,
            required: reminder.required,
        });
        Ok(())
    }

    async fn resolve_voter(
        &self,
        _engine: &Engine,
        _request: &ApprovalRequest,
        user: &str,
    ) -> Result<Voter, ChannelError> {
        let principal = format!("teams:{user}")
            .parse()
            .map_err(|error| ChannelError::Permanent(format!("{error}")))?;
        Ok(Voter::new(principal))
    }

    fn routes(self: Arc<Self>, _engine: Engine, _body_limit: usize) -> axum::Router {
        axum::Router::new()
    }
}
