// ControlConnection: the framed read loop and the ordered write queue of one control connection.
// Everything that touches the socket, the timers or the state runs on strand_, so the io_context
// may be run by any number of threads; send() and close() only post onto it.
#include <exception>

#include <spdlog/spdlog.h>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/buffer.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/write.hpp>

#include "kvf/fabric/control_channel.h"

namespace kvf::fabric {

namespace asio = boost::asio;
using boost::system::error_code;

namespace {

// A payload buffer this large is released after its frame, so that one big RecvPlan does not pin
// megabytes per idle connection.
constexpr size_t kKeepPayloadCapacity = 1u << 20;
// Frames gathered into one async_write: fewer syscalls for bursts of small messages.
constexpr size_t kMaxFramesPerWrite = 64;

std::string remote_of(const asio::ip::tcp::socket& socket) {
  error_code ec;
  const auto endpoint = socket.remote_endpoint(ec);
  return ec ? std::string("<unknown peer>") : endpoint_to_string(endpoint);
}

std::string ms_text(std::chrono::milliseconds d) {
  return std::to_string(d.count()) + " ms";
}

}  // namespace

std::shared_ptr<ControlConnection> ControlConnection::adopt(asio::ip::tcp::socket socket,
                                                            ControlOptions options) {
  return std::make_shared<ControlConnection>(Private{}, std::move(socket), options);
}

ControlConnection::ControlConnection(Private, asio::ip::tcp::socket socket, ControlOptions options)
    : options_(options),
      socket_(std::move(socket)),
      strand_(asio::make_strand(socket_.get_executor())),
      read_timer_(socket_.get_executor()),
      write_timer_(socket_.get_executor()),
      remote_(remote_of(socket_)) {
  error_code ignored;
  // Control messages are small and latency-bound; keepalive eventually notices a vanished host.
  socket_.set_option(asio::ip::tcp::no_delay(true), ignored);
  socket_.set_option(asio::socket_base::keep_alive(true), ignored);
}

ControlConnection::~ControlConnection() = default;

void ControlConnection::start(MessageHandler on_message, CloseHandler on_close) {
  asio::post(strand_, [self = shared_from_this(), on_message = std::move(on_message),
                       on_close = std::move(on_close)]() mutable {
    self->do_start(std::move(on_message), std::move(on_close));
  });
}

void ControlConnection::send(const protocol::Message& message) {
  std::vector<uint8_t> frame = protocol::encode_frame(message);
  queued_bytes_.fetch_add(frame.size(), std::memory_order_relaxed);
  asio::post(strand_, [self = shared_from_this(), frame = std::move(frame)]() mutable {
    self->enqueue(std::move(frame));
  });
}

void ControlConnection::close(Status reason) {
  asio::post(strand_, [self = shared_from_this(), reason = std::move(reason)]() mutable {
    self->begin_close(std::move(reason));
  });
}

void ControlConnection::do_start(MessageHandler on_message, CloseHandler on_close) {
  if (started_) return;
  started_ = true;
  if (state_ == State::kClosed) {
    // Ended before anyone listened (e.g. a write failed): still report it, once.
    if (on_close) on_close(close_reason_);
    return;
  }
  on_message_ = std::move(on_message);
  on_close_ = std::move(on_close);
  if (state_ == State::kOpen) read_header();
}

void ControlConnection::read_header() {
  if (header_have_ == 0 && options_.idle_timeout.count() > 0) {
    arm_read_timer(options_.idle_timeout, Status(ErrorCode::kTimeout, "no frame from " + remote_ + " for " +
                                                                          ms_text(options_.idle_timeout)));
  }
  // read_some rather than read: the frame deadline starts with the first byte, not the sixteenth.
  socket_.async_read_some(
      asio::buffer(header_bytes_.data() + header_have_, header_bytes_.size() - header_have_),
      asio::bind_executor(strand_, [self = shared_from_this()](const error_code& ec, size_t n) {
        self->on_header_bytes(ec, n);
      }));
}

void ControlConnection::on_header_bytes(const error_code& ec, size_t n) {
  if (state_ != State::kOpen) return;  // closing: reads are abandoned
  if (ec) {
    on_read_error(ec);
    return;
  }
  if (header_have_ == 0 && n > 0) {
    disarm_read_timer();
    if (options_.read_timeout.count() > 0) {
      arm_read_timer(options_.read_timeout,
                     Status(ErrorCode::kTimeout, "frame from " + remote_ + " not complete within " +
                                                     ms_text(options_.read_timeout)));
    }
  }
  header_have_ += n;
  if (header_have_ < header_bytes_.size()) {
    read_header();
    return;
  }
  auto header = protocol::decode_frame_header(header_bytes_);
  if (!header.ok()) {
    reject(header.status());
    return;
  }
  header_ = *header;
  // Only now, with payload_bytes checked against kMaxFramePayload, is the buffer sized.
  payload_.resize(header_.payload_bytes);
  if (payload_.empty()) {
    on_payload(error_code());
    return;
  }
  asio::async_read(
      socket_, asio::buffer(payload_),
      asio::bind_executor(strand_, [self = shared_from_this()](const error_code& read_ec, size_t) {
        self->on_payload(read_ec);
      }));
}

void ControlConnection::on_payload(const error_code& ec) {
  if (state_ != State::kOpen) return;
  if (ec) {
    on_read_error(ec);
    return;
  }
  disarm_read_timer();
  auto message = protocol::decode_payload(header_, payload_);
  header_have_ = 0;
  if (payload_.capacity() > kKeepPayloadCapacity) {
    std::vector<uint8_t>().swap(payload_);
  }
  if (!message.ok()) {
    reject(message.status());
    return;
  }
  if (on_message_) {
    try {
      on_message_(*message);
    } catch (const std::exception& e) {
      begin_close(Status(ErrorCode::kInternal, std::string("message handler threw: ") + e.what()));
      return;
    }
  }
  if (state_ == State::kOpen) read_header();
}

void ControlConnection::on_read_error(const error_code& ec) {
  const bool mid_frame = header_have_ > 0;
  std::string message;
  if (ec == asio::error::eof) {
    message = "connection closed by " + remote_ + (mid_frame ? " in the middle of a frame" : "");
  } else {
    message = "read from " + remote_ + " failed: " + ec.message();
  }
  finish(Status(ErrorCode::kPeerLost, std::move(message)));
}

void ControlConnection::reject(Status reason) {
  // The decoder's code says whether the peer spoke garbage or a version we do not know; anything
  // else coming through here is a timeout, which the peer should hear about too.
  protocol::ErrorReply reply{reason.code(), reason.message().substr(0, protocol::kMaxStringBytes)};
  enqueue(protocol::encode_frame(reply));
  begin_close(std::move(reason));
}

void ControlConnection::enqueue(std::vector<uint8_t> frame) {
  if (state_ != State::kOpen) {
    queued_bytes_.fetch_sub(frame.size(), std::memory_order_relaxed);
    return;
  }
  queue_.push_back(std::move(frame));
  if (!writing_) write_next();
}

void ControlConnection::write_next() {
  if (queue_.empty()) {
    writing_ = false;
    disarm_write_timer();
    if (state_ == State::kClosing) finish(close_reason_);
    return;
  }
  writing_ = true;
  inflight_.clear();
  std::vector<asio::const_buffer> buffers;
  while (!queue_.empty() && inflight_.size() < kMaxFramesPerWrite) {
    inflight_.push_back(std::move(queue_.front()));
    queue_.pop_front();
    buffers.emplace_back(asio::buffer(inflight_.back()));
  }
  // While closing, the single flush deadline armed in begin_close() applies instead.
  if (state_ == State::kOpen && options_.write_timeout.count() > 0) arm_write_timer(options_.write_timeout);
  asio::async_write(socket_, buffers,
                    asio::bind_executor(strand_, [self = shared_from_this()](const error_code& ec, size_t) {
                      size_t done = 0;
                      for (const auto& frame : self->inflight_) done += frame.size();
                      self->queued_bytes_.fetch_sub(done, std::memory_order_relaxed);
                      self->inflight_.clear();
                      if (self->state_ == State::kClosed) return;
                      if (ec) {
                        self->finish(Status(ErrorCode::kPeerLost,
                                            "write to " + self->remote_ + " failed: " + ec.message()));
                        return;
                      }
                      self->write_next();
                    }));
}

void ControlConnection::begin_close(Status reason) {
  if (state_ != State::kOpen) return;
  state_ = State::kClosing;
  close_reason_ = std::move(reason);
  disarm_read_timer();
  if (!writing_) {
    finish(close_reason_);
    return;
  }
  const auto flush = options_.write_timeout.count() > 0 ? options_.write_timeout : options_.read_timeout;
  if (flush.count() > 0) {
    arm_write_timer(flush);
  }
}

void ControlConnection::finish(Status reason) {
  if (state_ == State::kClosed) return;
  // While closing, the reason given to close()/reject() wins over the write error it may cause.
  if (state_ == State::kClosing) reason = close_reason_;
  state_ = State::kClosed;
  close_reason_ = reason;
  disarm_read_timer();
  disarm_write_timer();
  error_code ignored;
  socket_.shutdown(asio::ip::tcp::socket::shutdown_both, ignored);
  socket_.close(ignored);
  size_t dropped = 0;
  for (const auto& frame : queue_) dropped += frame.size();
  queued_bytes_.fetch_sub(dropped, std::memory_order_relaxed);
  queue_.clear();
  // Handlers often capture this connection; dropping them here breaks that cycle.
  on_message_ = nullptr;
  CloseHandler on_close = std::move(on_close_);
  on_close_ = nullptr;
  if (!reason.ok()) spdlog::debug("control connection {} closed: {}", remote_, reason.to_string());
  if (on_close) {
    try {
      on_close(reason);
    } catch (const std::exception& e) {
      spdlog::error("control connection {}: close handler threw: {}", remote_, e.what());
    }
  }
  std::lock_guard lock(ended_mutex_);
  ended_ = true;
  ended_cv_.notify_all();
}

bool ControlConnection::wait_closed(std::chrono::milliseconds timeout) {
  std::unique_lock lock(ended_mutex_);
  return ended_cv_.wait_for(lock, timeout, [this] { return ended_; });
}

void ControlConnection::arm_read_timer(std::chrono::milliseconds after, Status on_expiry) {
  const uint64_t gen = ++read_timer_gen_;
  read_timer_.expires_after(after);
  read_timer_.async_wait(asio::bind_executor(
      strand_,
      [self = shared_from_this(), gen, on_expiry = std::move(on_expiry)](const error_code& ec) mutable {
        if (ec || gen != self->read_timer_gen_ || self->state_ != State::kOpen) return;
        self->reject(std::move(on_expiry));
      }));
}

void ControlConnection::disarm_read_timer() {
  ++read_timer_gen_;
  read_timer_.cancel();
}

void ControlConnection::arm_write_timer(std::chrono::milliseconds after) {
  const uint64_t gen = ++write_timer_gen_;
  write_timer_.expires_after(after);
  write_timer_.async_wait(
      asio::bind_executor(strand_, [self = shared_from_this(), gen, after](const error_code& ec) {
        if (ec || gen != self->write_timer_gen_ || self->state_ == State::kClosed) return;
        self->finish(Status(ErrorCode::kTimeout,
                            "write to " + self->remote_ + " did not complete within " +
                                ms_text(std::chrono::duration_cast<std::chrono::milliseconds>(after))));
      }));
}

void ControlConnection::disarm_write_timer() {
  ++write_timer_gen_;
  write_timer_.cancel();
}

}  // namespace kvf::fabric
