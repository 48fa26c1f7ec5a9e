// cowtap_guest: a simulated Xen guest with a blkfront-like disk driver. It
// connects to a sim hypervisor's socket as a domain, attaches to one VBD and
// runs a scenario (see xen-glue/blkfront_guest.h), printing one PASS/FAIL
// line per check and "result: N passed, M failed". Thin: flags -> RunGuest.
#include <CLI/CLI.hpp>

#include <iostream>

#include "base/log.h"
#include "xen-glue/blkfront_guest.h"

int main(int argc, char** argv) {
  using cowtap::xen::BlkifAbi;
  using cowtap::xen::InitialContent;
  cowtap::xen::GuestRunOptions o;
  CLI::App app{"cowtap_guest: simulated Xen guest running a blkfront-like driver against a sim hypervisor"};
  std::string abi = "x86_64", mode = "random", initial = "unknown", log_level = "warn";
  bool no_protocol = false, no_persistent = false, no_flush = false, no_barrier = false, no_discard = false;
  bool no_wait = false, legacy_ring_ref = false, no_final_verify = false, no_range_check = false;
  app.add_option("--socket", o.socket_path, "sim hypervisor Unix socket")->required();
  app.add_option("--domid", o.domid, "domain id to connect as");
  app.add_option("--devid", o.devid, "virtual device id (51712 = xvda)");
  app.add_option("--ram-pages", o.ram_pages, "guest RAM in 4 KiB pages");
  app.add_option("--grant-entries", o.grant_entries, "grant table entries");
  app.add_option("--scenario", o.scenario, "what to run")->check(CLI::IsMember(cowtap::xen::GuestScenarios()));
  app.add_option("--abi", abi, "request ABI")->check(CLI::IsMember({"x86_64", "x86_32"}));
  app.add_flag("--no-protocol", no_protocol, "leave the protocol key absent (native ABI)");
  app.add_option("--ring-order", o.front.max_ring_page_order, "max ring-page-order to use");
  app.add_flag("--legacy-ring-ref", legacy_ring_ref, "single-page ring with the ring-ref key");
  app.add_option("--queues", o.front.max_queues, "max queues to use");
  app.add_flag("--no-persistent", no_persistent, "do not use persistent grants");
  app.add_option("--indirect", o.front.max_indirect_segments, "max indirect segments (0: off)");
  app.add_flag("--no-flush", no_flush, "do not use flush");
  app.add_flag("--no-barrier", no_barrier, "do not use barriers");
  app.add_flag("--no-discard", no_discard, "do not use discard");
  app.add_flag("--no-wait-initwait", no_wait, "write ring keys without waiting for InitWait");
  app.add_flag("--no-range-check", no_range_check, "let out-of-range requests reach the backend");
  app.add_option("--timeout-ms", o.front.handshake_timeout_ms, "handshake / state-change timeout");
  app.add_option("--mode", mode, "workload access pattern")->check(CLI::IsMember({"random", "sequential"}));
  app.add_option("--read-pct", o.workload.read_percent, "percent of data ops that read");
  app.add_option("--discard-pct", o.workload.discard_percent, "percent of ops that discard");
  app.add_option("--barrier-pct", o.workload.barrier_percent, "percent of writes sent as barriers");
  app.add_option("--flush-every", o.workload.flush_every, "flush after every N writes");
  app.add_option("--bs", o.workload.block_sectors, "sectors per data op");
  app.add_flag("--random-sizes", o.workload.random_sizes, "1..bs sectors per op");
  app.add_option("--qd", o.workload.queue_depth, "queue depth");
  app.add_option("--ops", o.workload.ops, "ops to run (0: no limit)");
  app.add_option("--duration-ms", o.workload.duration_ms, "run time (0: no limit)");
  app.add_option("--seed", o.workload.seed, "workload seed");
  app.add_option("--region-start", o.workload.region_start, "first sector of the region");
  app.add_option("--region-sectors", o.workload.region_sectors, "sectors in the region (0: to the end)");
  app.add_option("--initial", initial, "what the region holds at start")
      ->check(CLI::IsMember({"unknown", "zero", "pattern"}));
  app.add_option("--initial-seed", o.workload.initial_seed, "seed of the initial pattern");
  app.add_flag("--no-final-verify", no_final_verify, "skip reading the whole region back at the end");
  app.add_option("--poll-timeout-ms", o.workload.poll_timeout_ms, "a request unanswered this long is an error");
  app.add_option("--reconnects", o.reconnects, "disconnect/reconnect cycles (scenario reconnect)");
  app.add_option("--misbehave-wait-ms", o.misbehave_wait_ms, "wait for answers to bad requests");
  app.add_option("--model-out", o.model_out, "write the workload's final model (uint32 LE per sector)");
  app.add_option("--initial-model", o.initial_model, "the region's model at start (the --model-out format)");
  app.add_option("--first-generation", o.workload.first_generation, "generation of the first write");
  app.add_option("--op-seed", o.workload.op_seed, "seed of the op choice (0: --seed)");
  app.add_option("--journal", o.workload.journal_path,
                 "append every request issued and answered here (xen-glue/workload_journal.h)");
  app.add_option("--log-level", log_level, "spdlog level");
  CLI11_PARSE(app, argc, argv);

  cowtap::InitLogging(log_level);
  o.front.abi = abi == "x86_32" ? BlkifAbi::kX86_32 : BlkifAbi::kX86_64;
  o.front.write_protocol = !no_protocol;
  o.front.legacy_single_page_keys = legacy_ring_ref;
  o.front.persistent_grants = !no_persistent;
  o.front.use_flush = !no_flush;
  o.front.use_barrier = !no_barrier;
  o.front.use_discard = !no_discard;
  o.front.wait_for_initwait = !no_wait;
  o.front.check_ranges = !no_range_check;
  o.workload.sequential = mode == "sequential";
  o.workload.initial = initial == "zero" ? InitialContent::kZero
                       : initial == "pattern" ? InitialContent::kPattern
                                              : InitialContent::kUnknown;
  o.workload.final_verify = !no_final_verify;
  return cowtap::xen::RunGuest(o, std::cout);
}
