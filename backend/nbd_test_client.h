// A minimal NBD client for the server's tests (nbd_server_test.cc): speaks
// the handshake and transmission phase byte by byte so that tests can also
// send what no real client would (bad magic, huge lengths, half requests).
// Every read has a 5 s timeout so a server bug fails a test instead of
// hanging it.
//
// Thread-safety: one client per thread.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace cowtap::backend::testing {

struct NbdTestReply {
  bool structured = false;
  uint16_t flags = 0;  // structured chunk flags
  uint16_t type = 0;   // structured chunk type
  uint32_t error = 0;  // simple reply error, or the structured error chunk's
  uint64_t handle = 0;
  std::vector<uint8_t> data;  // READ data (structured: after the offset)
  uint64_t offset = 0;        // structured OFFSET_DATA offset
  std::string message;        // structured error message
};

class NbdTestClient {
 public:
  NbdTestClient() = default;
  ~NbdTestClient();
  NbdTestClient(const NbdTestClient&) = delete;
  NbdTestClient& operator=(const NbdTestClient&) = delete;

  // Connects to "unix:/path" or "tcp:127.0.0.1:port".
  bool Connect(const std::string& address);
  int fd() const { return fd_; }
  void Close();

  // Reads the 18-byte greeting and sends client flags.
  bool Greet(uint32_t client_flags = 1);
  bool SendOption(uint32_t option, std::span<const uint8_t> data);
  // Reads one option reply; nullopt on EOF/timeout.
  struct OptionReply {
    uint32_t option = 0, type = 0;
    std::vector<uint8_t> data;
  };
  std::optional<OptionReply> ReadOptionReply();
  // Greet, optionally STRUCTURED_REPLY, then GO for `name`; fills size and
  // transmission flags. False if anything is off.
  bool Handshake(const std::string& name = "", bool structured = false);
  uint64_t size() const { return size_; }
  uint16_t transmission_flags() const { return flags_; }

  bool SendRequest(uint16_t flags, uint16_t type, uint64_t handle, uint64_t offset, uint32_t length,
                   std::span<const uint8_t> payload = {});
  bool SendRaw(std::span<const uint8_t> bytes);
  // Reads one reply. For a simple reply, read_length is how many data bytes
  // follow a successful one (the client must know: READ's length).
  std::optional<NbdTestReply> ReadReply(uint32_t read_length);
  // True if the server closed the connection (EOF within 5 s).
  bool WaitClosed();

  bool ReadFull(void* buf, size_t length);

 private:
  int fd_ = -1;
  uint64_t size_ = 0;
  uint16_t flags_ = 0;
  bool structured_ = false;
};

}  // namespace cowtap::backend::testing
