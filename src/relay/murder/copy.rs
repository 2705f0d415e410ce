//! COPY and MOVE (and their UID forms) in a session with mounts. Within one backend the
//! command is relayed with the target name translated. Between backends the gateway does it:
//! it reads each message's flags and internal date, streams its body from the selected
//! mailbox into an APPEND on the target, and for MOVE removes exactly the copied messages
//! from the source (UID EXPUNGE). Until everything is copied the source is untouched; a
//! failure half-way removes the copies already made on the target and answers NO.

use super::names;
use super::wire::ForwardError;
use super::{Conn, End, MAX_REWRITTEN, Murder, Place, Slot, Step, Updates};
use crate::proto::args::{self, Item, LiteralForm, Value};
use crate::proto::framer::parse_literal_suffix;
use crate::proto::response::{Status, parse_status_line};

/// Most messages one COPY or MOVE takes to another server: their flags and dates are held
/// while the bodies stream, and the client is told to copy in parts beyond this.
const MAX_CROSS_COPY: usize = 10_000;

/// One message to copy.
struct Meta {
    uid: u32,
    flags: Vec<Vec<u8>>,
    date: Vec<u8>,
}

/// Why a cross-server copy stopped.
enum Failure {
    /// The source connection broke.
    SourceLost,
    /// The target connection broke.
    TargetLost,
    /// A server said NO or BAD; the client gets this code and text.
    Refused { code: Option<String>, text: String },
}

impl Murder<'_> {
    /// COPY or MOVE (`mv`), or their UID forms (`uid`, where the arguments follow the
    /// sub-command).
    pub(super) async fn copy(
        &mut self,
        tag: &[u8],
        cmd: &[u8],
        items: &[Item<'_>],
        mv: bool,
        uid: bool,
        literals: bool,
    ) -> Step {
        let idx = if uid { 2 } else { 1 };
        if self.selection_lost {
            return self.unavailable(tag).await;
        }
        let Some(s) = self.selected else {
            // Nothing selected: home gives the standard answer.
            return self
                .exec_raw(0, cmd, tag, literals, Updates::Deliver)
                .await
                .map(drop);
        };
        let (Some(set), Some(name)) = (
            items.get(idx - 1).and_then(|i| i.value.as_bytes()),
            items.get(idx).and_then(|i| i.value.as_bytes()),
        ) else {
            return self
                .reply(tag, "BAD", None, "Expected a message set and a mailbox")
                .await;
        };
        // The set goes into the gateway's own FETCH: only sequence-set characters may pass.
        if set.is_empty()
            || !set
                .iter()
                .all(|b| b.is_ascii_digit() || b":,*$".contains(b))
        {
            return self.reply(tag, "BAD", None, "Invalid message set").await;
        }
        let set = set.to_vec();
        let (t, tname) = match self.place(name).await {
            Place::On(t, n) => (t, n),
            other => return self.refuse_place(tag, other).await,
        };
        if t == s {
            let cmd = if t == 0 {
                cmd.to_vec()
            } else {
                super::replace_args(cmd, &[(&items[idx], tname)])
            };
            let literals = literals || super::needs_literal(&cmd);
            return self
                .exec_raw(t, &cmd, tag, literals, Updates::Deliver)
                .await
                .map(drop);
        }
        if self.up(s).is_none() {
            return self.unavailable(tag).await;
        }
        if mv && !self.up(s).is_some_and(|c| c.has("UIDPLUS")) {
            return self
                .reply(
                    tag,
                    "NO",
                    Some("CANNOT"),
                    "MOVE to another server needs UIDPLUS on this one",
                )
                .await;
        }
        if !self.up(t).is_some_and(|c| c.has("LITERAL+")) {
            return self
                .reply(
                    tag,
                    "NO",
                    Some("CANNOT"),
                    "The target server does not take streamed messages",
                )
                .await;
        }

        // Both connections leave their slots for the duration; they go back below whatever
        // happens.
        let (Slot::Up(mut src), Slot::Up(mut dst)) = (
            std::mem::replace(&mut self.conns[s].slot, Slot::Idle),
            std::mem::replace(&mut self.conns[t].slot, Slot::Idle),
        ) else {
            return Err(End::HomeLost);
        };
        let mut updates: Vec<Vec<u8>> = Vec::new();
        let mut expunges: Vec<Vec<u8>> = Vec::new();
        let outcome = match transfer(&mut src, &mut dst, &set, uid, &tname, &mut updates).await {
            // MOVE: remove the originals only once every copy exists.
            Ok(done) if mv => match expunge(&mut src, &done, &mut expunges).await {
                Ok(()) => Ok(done),
                Err(f) => {
                    remove_copies(&mut dst, &tname, &done.dst).await;
                    Err(f)
                }
            },
            other => other,
        };
        // A target left inside an APPEND literal cannot be used again.
        let target_ok = !matches!(outcome, Err(Failure::TargetLost)) && !dst.mid_command;
        let source_ok = !matches!(outcome, Err(Failure::SourceLost));
        self.conns[s].slot = if source_ok {
            Slot::Up(src)
        } else {
            Slot::Down(tokio::time::Instant::now())
        };
        self.conns[t].slot = if target_ok {
            Slot::Up(dst)
        } else {
            Slot::Down(tokio::time::Instant::now())
        };
        if !source_ok && s == 0 {
            return Err(End::HomeLost);
        }
        if !target_ok && t == 0 {
            return Err(End::HomeLost);
        }
        self.ctx.counters.cross_server_copy(outcome.is_ok());
        for u in &updates {
            self.client.write(u).await.map_err(|_| End::ClientGone)?;
        }
        match outcome {
            Ok(done) => {
                let code = copyuid(done.validity, &done.src, &done.dst);
                if mv {
                    if let Some(code) = &code {
                        let line = format!("* OK [{code}] Moved\r\n");
                        self.client
                            .write(line.as_bytes())
                            .await
                            .map_err(|_| End::ClientGone)?;
                    }
                    for e in &expunges {
                        self.client.write(e).await.map_err(|_| End::ClientGone)?;
                    }
                    self.reply(tag, "OK", None, "Move completed").await
                } else {
                    self.reply(tag, "OK", code.as_deref(), "Copy completed")
                        .await
                }
            }
            Err(Failure::Refused { code, text }) => {
                self.reply(tag, "NO", code.as_deref(), &text).await
            }
            Err(Failure::SourceLost | Failure::TargetLost) => self.unavailable(tag).await,
        }
    }
}

/// `COPYUID validity src dst` when the target reported every new UID (UIDPLUS).
fn copyuid(validity: Option<u32>, src: &[u32], dst: &[u32]) -> Option<String> {
    let v = validity?;
    if dst.len() != src.len() || src.is_empty() {
        return None;
    }
    let join = |u: &[u32]| u.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    Some(format!("COPYUID {v} {} {}", join(src), join(dst)))
}

/// What a cross-server copy made.
struct Appended {
    /// Source UIDs, in order.
    src: Vec<u32>,
    /// Target UIDs (APPENDUID), when the target reported them.
    dst: Vec<u32>,
    /// The target mailbox's UIDVALIDITY, when reported.
    validity: Option<u32>,
    /// Source UIDs that were `\Deleted` before the copy (MOVE must leave them so).
    were_deleted: Vec<u32>,
}

/// Copies the messages `set` of the source's selected mailbox to `tname` on the target.
/// Returns the source UIDs, the target UIDs and the target's UIDVALIDITY (when reported).
/// On failure, copies already made on the target are removed.
async fn transfer(
    src: &mut Conn,
    dst: &mut Conn,
    set: &[u8],
    uid: bool,
    tname: &[u8],
    updates: &mut Vec<Vec<u8>>,
) -> Result<Appended, Failure> {
    let metas = fetch_meta(src, set, uid, updates).await?;
    let mut src_uids = Vec::new();
    let mut dst_uids = Vec::new();
    let mut validity = None;
    for meta in &metas {
        match copy_one(src, dst, meta, tname, updates).await {
            Ok(appended) => {
                src_uids.push(meta.uid);
                if let Some((v, u)) = appended {
                    validity = Some(v);
                    dst_uids.push(u);
                }
            }
            Err(f) => {
                // Never into a target left inside an APPEND literal.
                if !matches!(f, Failure::TargetLost)
                    && !dst.mid_command
                    && dst_uids.len() == src_uids.len()
                {
                    remove_copies(dst, tname, &dst_uids).await;
                }
                return Err(f);
            }
        }
    }
    let were_deleted = metas
        .iter()
        .filter(|m| m.flags.iter().any(|f| f.eq_ignore_ascii_case(b"\\Deleted")))
        .map(|m| m.uid)
        .collect();
    Ok(Appended {
        src: src_uids,
        dst: dst_uids,
        validity,
        were_deleted,
    })
}

/// Flags, internal date and UID of each message of the set.
async fn fetch_meta(
    src: &mut Conn,
    set: &[u8],
    uid: bool,
    updates: &mut Vec<Vec<u8>>,
) -> Result<Vec<Meta>, Failure> {
    let tag = src.tag();
    let mut cmd = format!("{tag} {}FETCH ", if uid { "UID " } else { "" }).into_bytes();
    cmd.extend_from_slice(set);
    cmd.extend_from_slice(b" (UID FLAGS INTERNALDATE)\r\n");
    src.wire
        .write(&cmd)
        .await
        .map_err(|_| Failure::SourceLost)?;
    let mut metas = Vec::new();
    let mut too_many = false;
    await_tagged(
        src,
        &tag,
        || Failure::SourceLost,
        &mut |msg| match parse_meta(&msg) {
            Some(_) if metas.len() >= MAX_CROSS_COPY => too_many = true,
            Some(m) => metas.push(m),
            None if updates.len() < MAX_CROSS_COPY => updates.push(msg),
            None => {}
        },
    )
    .await?;
    if too_many {
        return Err(Failure::Refused {
            code: Some("LIMIT".into()),
            text: format!("Copy at most {MAX_CROSS_COPY} messages to another server at once"),
        });
    }
    Ok(metas)
}

/// Reads `conn`'s responses up to the one tagged `tag`, giving each untagged one to
/// `untagged`. Ok carries the OK's response code; NO or BAD become [`Failure::Refused`].
async fn await_tagged(
    conn: &mut Conn,
    tag: &str,
    lost: fn() -> Failure,
    untagged: &mut (dyn FnMut(Vec<u8>) + Send),
) -> Result<Option<String>, Failure> {
    loop {
        let msg = conn.wire.whole(MAX_REWRITTEN).await.map_err(|_| lost())?;
        if args::head(&msg).is_none_or(|(t, _, _)| t != tag.as_bytes()) {
            untagged(msg);
            continue;
        }
        return match parse_status_line(&msg) {
            Some(s) if s.status == Status::Ok => Ok(s.code.map(str::to_owned)),
            Some(s) => Err(Failure::Refused {
                code: s.code.map(str::to_owned),
                text: s.text.to_owned(),
            }),
            None => Err(lost()),
        };
    }
}

/// The UID, flags and internal date of a `* n FETCH (...)` response that has all three.
fn parse_meta(msg: &[u8]) -> Option<Meta> {
    let (_, _, off) = args::head(msg)?;
    let items = args::parse(msg, off).ok()?;
    if !items
        .first()?
        .value
        .as_bytes()?
        .eq_ignore_ascii_case(b"FETCH")
    {
        return None;
    }
    let Value::List(att) = &items.get(1)?.value else {
        return None;
    };
    let (mut uid, mut flags, mut date) = (None, None, None);
    for pair in att.chunks(2) {
        let [k, v] = pair else { break };
        let key = k.value.as_bytes()?.to_ascii_uppercase();
        match key.as_slice() {
            b"UID" => uid = std::str::from_utf8(v.value.as_bytes()?).ok()?.parse().ok(),
            b"FLAGS" => {
                let Value::List(f) = &v.value else {
                    return None;
                };
                flags = Some(
                    f.iter()
                        .filter_map(|x| x.value.as_bytes())
                        // \Recent belongs to the server's session; APPEND may not set it.
                        .filter(|x| !x.eq_ignore_ascii_case(b"\\Recent"))
                        .map(<[u8]>::to_vec)
                        .collect(),
                );
            }
            b"INTERNALDATE" => date = Some(v.value.as_bytes()?.to_vec()),
            _ => {}
        }
    }
    Some(Meta {
        uid: uid?,
        flags: flags?,
        date: date?,
    })
}

/// Streams one message from the source into an APPEND on the target. Returns the target's
/// `(UIDVALIDITY, UID)` when it reports APPENDUID.
async fn copy_one(
    src: &mut Conn,
    dst: &mut Conn,
    meta: &Meta,
    tname: &[u8],
    updates: &mut Vec<Vec<u8>>,
) -> Result<Option<(u32, u32)>, Failure> {
    let ftag = src.tag();
    src.wire
        .write(format!("{ftag} UID FETCH {} (BODY.PEEK[])\r\n", meta.uid).as_bytes())
        .await
        .map_err(|_| Failure::SourceLost)?;
    let atag = dst.tag();
    let mut sent = false;
    loop {
        let head = src.wire.head().await.map_err(|_| Failure::SourceLost)?;
        if args::head(head).is_some_and(|(t, _, _)| t == ftag.as_bytes()) {
            let msg = src
                .wire
                .whole(MAX_REWRITTEN)
                .await
                .map_err(|_| Failure::SourceLost)?;
            match parse_status_line(&msg) {
                // The whole body reached the target: the copy stands, whatever else the
                // source says, and the target's answer must be read.
                _ if sent => break,
                Some(s) if s.status == Status::Ok => {
                    return Err(Failure::Refused {
                        code: Some("EXPUNGEISSUED".into()),
                        text: "A message to copy no longer exists".into(),
                    });
                }
                Some(s) => {
                    return Err(Failure::Refused {
                        code: s.code.map(str::to_owned),
                        text: s.text.to_owned(),
                    });
                }
                None => return Err(Failure::SourceLost),
            }
        }
        let body_literal = !sent
            && head.starts_with(b"* ")
            && memchr::memmem::find(&head.to_ascii_uppercase(), b"BODY[]").is_some();
        let literal = if body_literal {
            parse_literal_suffix(head)
        } else {
            None
        };
        let Some(literal) = literal else {
            // Another response (an update for the selected mailbox): the client gets it later.
            let msg = src
                .wire
                .whole(MAX_REWRITTEN)
                .await
                .map_err(|_| Failure::SourceLost)?;
            updates.push(msg);
            continue;
        };
        let head_len = head.len();
        let mut cmd = format!("{atag} APPEND ").into_bytes();
        args::push_string(&mut cmd, tname, LiteralForm::NonSync);
        cmd.extend_from_slice(b" (");
        cmd.extend_from_slice(&names::join(meta.flags.iter().map(Vec::as_slice), b' '));
        cmd.extend_from_slice(b") ");
        args::push_string(&mut cmd, &meta.date, LiteralForm::NonSync);
        cmd.extend_from_slice(format!(" {{{}+}}\r\n", literal.size).as_bytes());
        dst.mid_command = true;
        let sent_head = dst.wire.write(&cmd).await.is_ok();
        src.wire.consume(head_len);
        let body = if sent_head {
            src.wire
                .copy_exact(literal.size, &mut dst.wire.stream)
                .await
        } else {
            src.wire
                .copy_exact(literal.size, &mut tokio::io::sink())
                .await
                .and(Err(ForwardError::Sink))
        };
        let body = match body {
            Ok(()) if dst.wire.write(b"\r\n").await.is_err() => Err(ForwardError::Sink),
            other => other,
        };
        match body {
            Ok(()) => {}
            // `copy_exact` reports any lost source as `Source`; the target is dealt with below.
            Err(ForwardError::Source | ForwardError::Cut) => return Err(Failure::SourceLost),
            Err(ForwardError::Sink) => {
                // The target is gone; read the source's answer to the end so it stays usable.
                src.wire
                    .forward::<crate::stream::Stream>(None)
                    .await
                    .map_err(|_| Failure::SourceLost)?;
                await_tagged(src, &ftag, || Failure::SourceLost, &mut |m| updates.push(m)).await?;
                return Err(Failure::TargetLost);
            }
        }
        dst.mid_command = false;
        // The rest of the FETCH response (`)` and any item after the body).
        src.wire
            .forward::<crate::stream::Stream>(None)
            .await
            .map_err(|_| Failure::SourceLost)?;
        sent = true;
    }
    let code = await_tagged(dst, &atag, || Failure::TargetLost, &mut drop).await?;
    Ok(code.as_deref().and_then(parse_appenduid))
}

/// `APPENDUID <validity> <uid>` (RFC 4315).
fn parse_appenduid(code: &str) -> Option<(u32, u32)> {
    let mut words = code.split_ascii_whitespace();
    if !words.next()?.eq_ignore_ascii_case("APPENDUID") {
        return None;
    }
    Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
}

/// MOVE's second half: marks the copied messages and expunges exactly those.
async fn expunge(
    src: &mut Conn,
    done: &Appended,
    expunges: &mut Vec<Vec<u8>>,
) -> Result<(), Failure> {
    let join = |uids: &mut dyn Iterator<Item = u32>| {
        uids.map(|u| u.to_string()).collect::<Vec<_>>().join(",")
    };
    let set = join(&mut done.src.iter().copied());
    if set.is_empty() {
        return Ok(());
    }
    let refused = |f: Failure| match f {
        Failure::Refused { code, text } => Failure::Refused {
            code,
            text: format!("Copied, but the originals could not be removed: {text}"),
        },
        other => other,
    };
    run(
        src,
        &format!("UID STORE {set} +FLAGS.SILENT (\\Deleted)"),
        expunges,
    )
    .await
    .map_err(refused)?;
    if let Err(f) = run(src, &format!("UID EXPUNGE {set}"), expunges).await {
        // Put the flags back as they were, so the source is left as it was.
        let marked = join(
            &mut done
                .src
                .iter()
                .copied()
                .filter(|u| !done.were_deleted.contains(u)),
        );
        if !marked.is_empty() {
            let _ = run(
                src,
                &format!("UID STORE {marked} -FLAGS.SILENT (\\Deleted)"),
                expunges,
            )
            .await;
        }
        return Err(refused(f));
    }
    Ok(())
}

/// Sends one command of the gateway's own to `conn` and reads its answer; untagged responses
/// go to `untagged`.
async fn run(conn: &mut Conn, cmd: &str, untagged: &mut Vec<Vec<u8>>) -> Result<(), Failure> {
    let tag = conn.tag();
    conn.wire
        .write(format!("{tag} {cmd}\r\n").as_bytes())
        .await
        .map_err(|_| Failure::SourceLost)?;
    await_tagged(conn, &tag, || Failure::SourceLost, &mut |m| {
        untagged.push(m)
    })
    .await
    .map(drop)
}

/// Removes messages appended to `tname` on the target (a failed copy leaves nothing behind).
/// Best effort: the client's answer is NO either way.
async fn remove_copies(dst: &mut Conn, tname: &[u8], uids: &[u32]) {
    if uids.is_empty() || !dst.has("UIDPLUS") {
        return;
    }
    let set = uids
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut select = b"SELECT ".to_vec();
    args::push_string(&mut select, tname, LiteralForm::NonSync);
    // CLOSE would expunge every \Deleted message there, not only the copies; a failing
    // EXAMINE deselects without expunging (RFC 3501).
    let unselect = if dst.has("UNSELECT") {
        "UNSELECT"
    } else {
        "EXAMINE \"\""
    };
    for cmd in [
        select,
        format!("UID STORE {set} +FLAGS.SILENT (\\Deleted)").into_bytes(),
        format!("UID EXPUNGE {set}").into_bytes(),
        unselect.as_bytes().to_vec(),
    ] {
        let tag = dst.tag();
        let mut line = format!("{tag} ").into_bytes();
        line.extend_from_slice(&cmd);
        line.extend_from_slice(b"\r\n");
        if dst.wire.write(&line).await.is_err() || super::read_until_quiet(dst, &tag).await.is_err()
        {
            return;
        }
    }
}
