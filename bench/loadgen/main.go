// loadgen: a verifying load generator for line-echo servers (stdlib only).
//
// Load mode (default): -conns connections each keep -depth requests of exactly
// -size bytes (the trailing '\n' included) in flight. Every echoed byte is
// compared with what was sent, in order; a mismatch is counted, ends that
// connection and makes the exit status non-zero. Only requests completed
// inside the measured window (after -warmup, for -duration seconds) count.
// With -requests N the run is a fixed amount of work instead: N requests over
// the connections (no warmup; -duration is then the time allowed), for
// counting what a server does per request (bench/syscalls.py).
//
// Short mode (-short): each of -conns clients connects, sends one line,
// verifies its echo and closes, over and over, for the same window: it
// measures what a connection costs, not a request.
//
// Idle mode (-idle N): open N connections (at most -ramp dials at once, with
// bounded retries), do one verified echo on each, hold them all idle for -hold
// seconds, then do one more verified echo on every connection.
//
// With -server-pid the server's CPU time (/proc/PID/stat utime+stime) and RSS
// (/proc/PID/status VmRSS) are sampled at the exact edges of the measured
// window (load mode) or before/after the connections are opened (idle mode).
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"math/bits"
	"math/rand"
	"net"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

type config struct {
	addr        string
	conns       int
	size        int
	depth       int
	duration    float64
	warmup      float64
	jsonOut     bool
	idle        int
	hold        float64
	serverPid   int
	clkTck      int
	ramp        int
	retries     int
	dialTimeout float64
	echoTimeout float64
	rampTimeout float64
	maxFail     int
	requests    int
	short       bool
	sources     int
	tls         bool
}

// ---------------------------------------------------------------- requests

// generator produces the request bytes for (connection id, sequence number):
// a 16-byte hex header "iiiiissssssssss " naming both, then a window of a
// per-connection random printable pool that shifts with seq, then '\n'.
type generator struct {
	id   int
	size int
	pool []byte
}

func newGenerator(id, size int) *generator {
	rng := rand.New(rand.NewSource(int64(id)*7919 + 1))
	pool := make([]byte, 2*size)
	for i := range pool {
		pool[i] = byte(0x21 + rng.Intn(0x7e-0x21+1)) // printable, never '\n'
	}
	return &generator{id: id, size: size, pool: pool}
}

const hexDigits = "0123456789abcdef"

// fill writes request seq into dst (len(dst) == size).
func (g *generator) fill(dst []byte, seq uint64) {
	off := int(seq % uint64(g.size))
	copy(dst, g.pool[off:off+g.size])
	var hdr [16]byte
	v := uint64(g.id)&0xfffff<<44 | seq&(1<<44-1)
	for i := 14; i >= 0; i-- {
		hdr[i] = hexDigits[v&0xf]
		v >>= 4
	}
	hdr[15] = ' '
	copy(dst[:len(dst)-1], hdr[:])
	dst[len(dst)-1] = '\n'
}

// --------------------------------------------------------------- histogram

// Log-linear histogram of nanoseconds: exact below 128 ns, then 64 sub-buckets
// per power of two (relative error < 1.6 %).
const (
	subBits  = 6
	subCount = 1 << subBits
	nBuckets = 60 * subCount
)

type histogram struct {
	counts [nBuckets]uint64
	n      uint64
	sum    uint64
	max    uint64
}

func bucketOf(v uint64) int {
	if v < 2*subCount {
		return int(v)
	}
	e := bits.Len64(v) - subBits - 1
	return (e+1)*subCount + int(v>>uint(e)) - subCount
}

func bucketMid(i int) float64 {
	if i < 2*subCount {
		return float64(i)
	}
	e := uint(i/subCount - 1)
	m := uint64(i%subCount + subCount)
	lo := m << e
	hi := (m+1)<<e - 1
	return float64(lo+hi) / 2
}

func (h *histogram) record(ns uint64) {
	h.counts[bucketOf(ns)]++
	h.n++
	h.sum += ns
	if ns > h.max {
		h.max = ns
	}
}

func (h *histogram) merge(o *histogram) {
	for i, c := range o.counts {
		h.counts[i] += c
	}
	h.n += o.n
	h.sum += o.sum
	if o.max > h.max {
		h.max = o.max
	}
}

// quantile in microseconds.
func (h *histogram) quantile(q float64) float64 {
	if h.n == 0 {
		return 0
	}
	target := uint64(math.Ceil(q * float64(h.n)))
	if target < 1 {
		target = 1
	}
	var cum uint64
	for i, c := range h.counts {
		cum += c
		if cum >= target {
			v := bucketMid(i)
			if v > float64(h.max) {
				v = float64(h.max)
			}
			return v / 1000
		}
	}
	return float64(h.max) / 1000
}

// ------------------------------------------------------------------ errors

type errorLog struct {
	mu      sync.Mutex
	count   int
	samples []string
}

func (e *errorLog) add(format string, args ...interface{}) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.count++
	if len(e.samples) < 10 {
		e.samples = append(e.samples, fmt.Sprintf(format, args...))
	}
}

// ------------------------------------------------------------ /proc probes

type procSample struct {
	ok       bool
	cpuTicks uint64
	rssKiB   uint64
}

func sampleProc(pid int) procSample {
	if pid <= 0 {
		return procSample{}
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procSample{}
	}
	// Fields after the ")" that closes comm: state is field 3, utime 14, stime 15.
	s := string(stat)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(fields) < 13 {
		return procSample{}
	}
	ut, _ := strconv.ParseUint(fields[11], 10, 64)
	st, _ := strconv.ParseUint(fields[12], 10, 64)
	return procSample{ok: true, cpuTicks: ut + st, rssKiB: readRSS(pid)}
}

func readRSS(pid int) uint64 {
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(status), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			f := strings.Fields(line)
			if len(f) >= 2 {
				v, _ := strconv.ParseUint(f[1], 10, 64)
				return v
			}
		}
	}
	return 0
}

// cpuTimes reads the per-CPU lines of /proc/stat (clock ticks): the process
// times above leave out softirq time, which on loopback is where much of the
// TCP work of every send is accounted.
func cpuTimes() map[string][]uint64 {
	out := map[string][]uint64{}
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		return out
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 9 || !strings.HasPrefix(f[0], "cpu") || f[0] == "cpu" {
			continue
		}
		vals := make([]uint64, 8) // user nice system idle iowait irq softirq steal
		for i := range vals {
			vals[i], _ = strconv.ParseUint(f[i+1], 10, 64)
		}
		out[strings.TrimPrefix(f[0], "cpu")] = vals
	}
	return out
}

type coreStats struct {
	BusyPct    float64  `json:"busy_pct"`
	SoftirqPct float64  `json:"softirq_pct"`
	StealPct   float64  `json:"steal_pct"`
	IdlePct    float64  `json:"idle_pct"`
	BusyUsReq  *float64 `json:"busy_us_per_req,omitempty"`
}

// coreDelta turns two cpuTimes samples into percentages of the window (busy =
// user+nice+system+irq+softirq) and, given a request count, busy µs per request.
func coreDelta(a, b map[string][]uint64, window float64, clkTck int, reqs uint64) map[string]coreStats {
	out := map[string]coreStats{}
	for cpu, va := range a {
		vb, ok := b[cpu]
		if !ok {
			continue
		}
		d := make([]float64, 8)
		for i := range d {
			d[i] = float64(vb[i]-va[i]) / float64(clkTck)
		}
		busy := d[0] + d[1] + d[2] + d[5] + d[6]
		cs := coreStats{BusyPct: round2(busy / window * 100), SoftirqPct: round2(d[6] / window * 100),
			StealPct: round2(d[7] / window * 100), IdlePct: round2((d[3] + d[4]) / window * 100)}
		if reqs > 0 {
			cs.BusyUsReq = fptr(round2(busy * 1e6 / float64(reqs)))
		}
		out[cpu] = cs
	}
	return out
}

func selfCPU() float64 {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	tv := func(t syscall.Timeval) float64 { return float64(t.Sec) + float64(t.Usec)/1e6 }
	return tv(ru.Utime) + tv(ru.Stime)
}

func raiseNofile() uint64 {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0
	}
	if lim.Cur < lim.Max {
		lim.Cur = lim.Max
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
		_ = syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
	return lim.Cur
}

func secs(f float64) time.Duration { return time.Duration(f * float64(time.Second)) }

func round2(f float64) float64 { return math.Round(f*100) / 100 }

// --------------------------------------------------------------- load mode
//
// One OS thread drives every connection through its own epoll instance: after
// a readiness event, read once, verify, refill the pipeline and write the new
// requests in one write(2). Per request that is one read and one write, with
// epoll_wait shared by every connection that became ready meanwhile, and no
// failed read (EAGAIN) or goroutine park/unpark as with a goroutine per
// connection. The load generator needs about as much CPU per request as the
// fastest servers, so every syscall saved here matters.

const (
	phaseWarmup = iota
	phaseMeasure
	phaseStop
)

type connResult struct {
	hist       histogram
	measured   uint64 // requests completed inside the window
	verified   uint64 // every verified echo, warmup and drain included
	mismatches uint64
}

type econn struct {
	id       int
	fd       int
	gen      *generator
	expected [][]byte // ring of in-flight requests, slot = seq % depth
	sentAt   []int64
	seqSent  uint64
	seqRecv  uint64
	off      int    // bytes of request seqRecv already verified
	quota    uint64 // with -requests: requests this connection sends; 0 = no limit
	out      []byte // bytes queued but not yet accepted by write(2)
	wantOut  bool   // registered for EPOLLOUT
	closed   bool
	res      connResult
}

func (c *econn) inFlight() uint64 { return c.seqSent - c.seqRecv }

// refill queues new requests until depth are in flight (and no more than quota).
func (c *econn) refill(depth int, now int64) {
	for c.inFlight() < uint64(depth) && (c.quota == 0 || c.seqSent < c.quota) {
		slot := c.seqSent % uint64(depth)
		c.gen.fill(c.expected[slot], c.seqSent)
		c.sentAt[slot] = now
		c.out = append(c.out, c.expected[slot]...)
		c.seqSent++
	}
}

// writeLimit, with -split, caps a write(2) at one request, so that each
// request reaches the server as a segment of its own instead of coalesced.
var writeLimit int

// flush writes queued bytes; what the kernel does not take waits for EPOLLOUT.
func (c *econn) flush(epfd int) error {
	for len(c.out) > 0 {
		chunk := c.out
		if writeLimit > 0 && len(chunk) > writeLimit {
			chunk = chunk[:writeLimit]
		}
		n, err := syscall.Write(c.fd, chunk)
		if err == syscall.EINTR {
			continue
		}
		if err == syscall.EAGAIN {
			break
		}
		if err != nil {
			return err
		}
		c.out = c.out[:copy(c.out, c.out[n:])]
	}
	want := len(c.out) > 0
	if want != c.wantOut {
		ev := syscall.EpollEvent{Events: syscall.EPOLLIN, Fd: int32(c.fd)}
		if want {
			ev.Events |= syscall.EPOLLOUT
		}
		if err := syscall.EpollCtl(epfd, syscall.EPOLL_CTL_MOD, c.fd, &ev); err != nil {
			return err
		}
		c.wantOut = want
	}
	return nil
}

// consume verifies received bytes against the in-flight requests, in order.
func (c *econn) consume(p []byte, size, depth int, now int64, measuring bool,
	errs *errorLog) bool {
	for len(p) > 0 {
		if c.inFlight() == 0 {
			c.res.mismatches++
			errs.add("conn %d: %d unexpected bytes after the last echo: %q", c.id, len(p), trunc(p))
			return false
		}
		slot := c.seqRecv % uint64(depth)
		exp := c.expected[slot]
		k := size - c.off
		if k > len(p) {
			k = len(p)
		}
		if !bytes.Equal(p[:k], exp[c.off:c.off+k]) {
			c.res.mismatches++
			errs.add("conn %d: echo of request %d differs at byte %d: got %q want %q",
				c.id, c.seqRecv, c.off, trunc(p[:k]), trunc(exp[c.off:c.off+k]))
			return false
		}
		c.off += k
		p = p[k:]
		if c.off == size {
			if measuring {
				c.res.measured++
				c.res.hist.record(uint64(now - c.sentAt[slot]))
			}
			c.res.verified++
			c.seqRecv++
			c.off = 0
		}
	}
	return true
}

func trunc(b []byte) []byte {
	if len(b) > 40 {
		return b[:40]
	}
	return b
}

type loadReport struct {
	Mode          string               `json:"mode"`
	Addr          string               `json:"addr"`
	Conns         int                  `json:"conns"`
	Connected     int                  `json:"connected"`
	Size          int                  `json:"size"`
	Depth         int                  `json:"depth"`
	WarmupS       float64              `json:"warmup_s"`
	DurationS     float64              `json:"duration_s"`
	Requests      uint64               `json:"requests"`
	ReqPerS       float64              `json:"req_per_s"`
	MBPerS        float64              `json:"mb_per_s"`
	LatencyUs     latencyJSON          `json:"latency_us"`
	Verified      uint64               `json:"verified"`
	Mismatches    uint64               `json:"mismatches"`
	Errors        int                  `json:"errors"`
	ErrorSamples  []string             `json:"error_samples"`
	LoadgenCPUS   float64              `json:"loadgen_cpu_s"`
	LoadgenCPUPct float64              `json:"loadgen_cpu_pct"`
	Cores         map[string]coreStats `json:"cores"`
	Server        *serverStats         `json:"server,omitempty"`
}

type latencyJSON struct {
	P50  float64 `json:"p50"`
	P90  float64 `json:"p90"`
	P99  float64 `json:"p99"`
	P999 float64 `json:"p999"`
	Max  float64 `json:"max"`
	Mean float64 `json:"mean"`
}

type serverStats struct {
	Pid          int      `json:"pid"`
	CPUS         *float64 `json:"cpu_s,omitempty"`
	CPUPct       *float64 `json:"cpu_pct,omitempty"`
	CPUUsPerReq  *float64 `json:"cpu_us_per_req,omitempty"`
	RSSKiBStart  uint64   `json:"rss_kib_start,omitempty"`
	RSSKiBEnd    uint64   `json:"rss_kib_end,omitempty"`
	RSSKiBBefore uint64   `json:"rss_kib_before,omitempty"`
	RSSKiBEstab  uint64   `json:"rss_kib_established,omitempty"`
	RSSKiBHeld   uint64   `json:"rss_kib_held,omitempty"`
	RSSKiBPerCon *float64 `json:"rss_kib_per_conn,omitempty"`
}

func fptr(f float64) *float64 { return &f }

func runLoad(cfg *config) (interface{}, bool) {
	errs := &errorLog{}
	runtime.LockOSThread()

	// Dial with the net package (timeouts, retries), then take over a dup of
	// the non-blocking socket and let the net.Conn go.
	var conns []*econn
	for i := 0; i < cfg.conns; i++ {
		nc, err := dialRetry(context.Background(), cfg)
		if err != nil {
			errs.add("conn %d: dial: %v", i, err)
			continue
		}
		fd := -1
		rc, err := nc.(*net.TCPConn).SyscallConn()
		if err == nil {
			err = rc.Control(func(f uintptr) {
				var derr error
				fd, derr = syscall.Dup(int(f))
				if derr != nil {
					fd = -1
				}
			})
		}
		nc.Close()
		if err != nil || fd < 0 {
			errs.add("conn %d: taking the socket over failed: %v", i, err)
			continue
		}
		c := &econn{id: i, fd: fd, gen: newGenerator(i, cfg.size),
			expected: make([][]byte, cfg.depth), sentAt: make([]int64, cfg.depth),
			out: make([]byte, 0, cfg.depth*cfg.size)}
		for j := range c.expected {
			c.expected[j] = make([]byte, cfg.size)
		}
		if cfg.requests > 0 { // spread N requests as evenly as the connections allow
			c.quota = uint64(cfg.requests / cfg.conns)
			if i < cfg.requests%cfg.conns {
				c.quota++
			}
		}
		conns = append(conns, c)
	}
	connected := len(conns)

	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen: epoll_create1:", err)
		os.Exit(2)
	}
	byFd := map[int32]*econn{}
	for _, c := range conns {
		ev := syscall.EpollEvent{Events: syscall.EPOLLIN, Fd: int32(c.fd)}
		if err := syscall.EpollCtl(epfd, syscall.EPOLL_CTL_ADD, c.fd, &ev); err != nil {
			fmt.Fprintln(os.Stderr, "loadgen: epoll_ctl:", err)
			os.Exit(2)
		}
		byFd[int32(c.fd)] = c
	}

	active := len(conns)
	closeConn := func(c *econn) {
		if !c.closed {
			c.closed = true
			syscall.Close(c.fd)
			active--
		}
	}
	fail := func(c *econn, format string, args ...interface{}) {
		errs.add(format, args...)
		closeConn(c)
	}

	start := time.Now()
	clock := func() int64 { return int64(time.Since(start)) }
	warmupEnd := int64(secs(cfg.warmup))
	measureEnd := warmupEnd + int64(secs(cfg.duration))
	hardEnd := measureEnd + int64(30*time.Second) // a stalled server is an error, not a hang
	if cfg.requests > 0 {
		// A fixed amount of work: the window opens at once and closes when the
		// last request is verified; -duration bounds how long that may take.
		warmupEnd, measureEnd, hardEnd = 0, math.MaxInt64, int64(secs(cfg.duration))
	}
	phase := phaseWarmup
	var t0, t1 int64
	var cpu0, cpu1 float64
	var srv0, srv1 procSample
	var cores0, cores1 map[string][]uint64
	advance := func(now int64) {
		if phase == phaseWarmup && now >= warmupEnd {
			phase = phaseMeasure
			t0, cpu0, srv0, cores0 = clock(), selfCPU(), sampleProc(cfg.serverPid), cpuTimes()
		}
		if phase == phaseMeasure && now >= measureEnd {
			phase = phaseStop
			t1, cpu1, srv1, cores1 = clock(), selfCPU(), sampleProc(cfg.serverPid), cpuTimes()
			for _, c := range conns { // idle ones are done; the rest drain first
				if !c.closed && c.inFlight() == 0 {
					closeConn(c)
				}
			}
		}
	}

	now := clock()
	advance(now)
	for _, c := range conns {
		c.refill(cfg.depth, now)
		if err := c.flush(epfd); err != nil {
			fail(c, "conn %d: write: %v", c.id, err)
		}
	}
	events := make([]syscall.EpollEvent, 512)
	rbufSize := 64 * 1024
	if cfg.depth*cfg.size > rbufSize {
		rbufSize = cfg.depth * cfg.size
	}
	rbuf := make([]byte, rbufSize)
	for active > 0 {
		timeout := 50
		if phase == phaseWarmup {
			if ms := int((warmupEnd-now)/int64(time.Millisecond)) + 1; ms < timeout {
				timeout = ms
			}
		} else if phase == phaseMeasure {
			if ms := int((measureEnd-now)/int64(time.Millisecond)) + 1; ms < timeout {
				timeout = ms
			}
		}
		n, err := syscall.EpollWait(epfd, events, timeout)
		if err != nil && err != syscall.EINTR {
			fmt.Fprintln(os.Stderr, "loadgen: epoll_wait:", err)
			os.Exit(2)
		}
		now = clock()
		advance(now)
		if now > hardEnd {
			for _, c := range conns {
				if !c.closed {
					fail(c, "conn %d: %d requests still in flight at the time limit "+
						"(30 s after the window, or -duration with -requests)", c.id, c.inFlight())
				}
			}
			break
		}
		for i := 0; i < n; i++ {
			c := byFd[events[i].Fd]
			if c == nil || c.closed {
				continue
			}
			ev := events[i].Events
			if ev&(syscall.EPOLLIN|syscall.EPOLLERR|syscall.EPOLLHUP) != 0 {
				m, err := syscall.Read(c.fd, rbuf)
				if err == syscall.EAGAIN || err == syscall.EINTR {
					continue
				}
				if err != nil {
					fail(c, "conn %d: read with %d requests in flight: %v", c.id, c.inFlight(), err)
					continue
				}
				if m == 0 {
					fail(c, "conn %d: EOF with %d requests in flight", c.id, c.inFlight())
					continue
				}
				if !c.consume(rbuf[:m], cfg.size, cfg.depth, now, phase == phaseMeasure, errs) {
					closeConn(c)
					continue
				}
				if c.quota > 0 && c.seqRecv == c.quota {
					closeConn(c) // its share of -requests is done and verified
					continue
				}
				if phase != phaseStop {
					c.refill(cfg.depth, now)
				} else if c.inFlight() == 0 {
					closeConn(c) // drained: every request sent has been verified
					continue
				}
			}
			if err := c.flush(epfd); err != nil {
				fail(c, "conn %d: write: %v", c.id, err)
			}
		}
	}
	syscall.Close(epfd)
	if t1 == 0 { // the loop ended before the window closed: -requests done, or all failed
		t1, cpu1, srv1, cores1 = clock(), selfCPU(), sampleProc(cfg.serverPid), cpuTimes()
		if t0 == 0 {
			t0, cpu0, srv0, cores0 = t1, cpu1, srv1, cores1
		}
	}

	results := make([]*connResult, len(conns))
	for i, c := range conns {
		results[i] = &c.res
	}
	rep := newLoadReport(cfg, "load", cfg.depth, connected, results, errs,
		float64(t1-t0)/1e9, cpu1-cpu0, srv0, srv1, cores0, cores1)
	measured, mismatches := rep.Requests, rep.Mismatches
	if cfg.requests > 0 && measured != uint64(cfg.requests) {
		errs.add("%d of the %d requests asked for were verified", measured, cfg.requests)
		rep.Errors, rep.ErrorSamples = errs.count, errs.samples
	}
	ok := mismatches == 0 && errs.count == 0 && connected == cfg.conns && measured > 0
	return rep, ok
}

// newLoadReport sums the connections' results into the report both load
// modes (epoll and -tls) print: the window, the load generator's own CPU,
// per-core busy time and, with -server-pid, the server's CPU and RSS.
func newLoadReport(cfg *config, mode string, depth, connected int, results []*connResult,
	errs *errorLog, window, selfCPUS float64, srv0, srv1 procSample,
	cores0, cores1 map[string][]uint64) loadReport {
	var hist histogram
	var measured, verified, mismatches uint64
	for _, r := range results {
		hist.merge(&r.hist)
		measured += r.measured
		verified += r.verified
		mismatches += r.mismatches
	}
	if window <= 0 {
		window = 1e-9
	}
	rep := loadReport{
		Mode: mode, Addr: cfg.addr, Conns: cfg.conns, Connected: connected,
		Size: cfg.size, Depth: depth, WarmupS: cfg.warmup, DurationS: math.Round(window*1000) / 1000,
		Requests: measured, ReqPerS: round2(float64(measured) / window),
		MBPerS:   round2(float64(measured) * float64(cfg.size) / window / 1e6),
		Verified: verified, Mismatches: mismatches, Errors: errs.count, ErrorSamples: errs.samples,
		LoadgenCPUS:   round2(selfCPUS),
		LoadgenCPUPct: round2(selfCPUS / window * 100),
		Cores:         coreDelta(cores0, cores1, window, cfg.clkTck, measured),
	}
	if rep.ErrorSamples == nil {
		rep.ErrorSamples = []string{}
	}
	if hist.n > 0 {
		rep.LatencyUs = latencyJSON{
			P50: round2(hist.quantile(0.50)), P90: round2(hist.quantile(0.90)),
			P99: round2(hist.quantile(0.99)), P999: round2(hist.quantile(0.999)),
			Max: round2(float64(hist.max) / 1000), Mean: round2(float64(hist.sum) / float64(hist.n) / 1000),
		}
	}
	if cfg.serverPid > 0 {
		s := &serverStats{Pid: cfg.serverPid, RSSKiBStart: srv0.rssKiB, RSSKiBEnd: srv1.rssKiB}
		if srv0.ok && srv1.ok {
			cpu := float64(srv1.cpuTicks-srv0.cpuTicks) / float64(cfg.clkTck)
			s.CPUS = fptr(round2(cpu))
			s.CPUPct = fptr(round2(cpu / window * 100))
			if measured > 0 {
				s.CPUUsPerReq = fptr(round2(cpu * 1e6 / float64(measured)))
			}
		}
		rep.Server = s
	}
	return rep
}

// -------------------------------------------------------------- short mode
//
// Each of -conns clients runs connect, write one request, verify its echo,
// close, then the next connection, from one thread and one epoll instance as
// in load mode. A socket is registered once, edge-triggered for both
// directions: the first EPOLLOUT edge says the connection is established (a
// failed connect surfaces as the write's error), the EPOLLIN edges bring the
// echo. Per connection that is socket, [setsockopt, bind,] connect,
// epoll_ctl, write, read and close, plus a share of epoll_wait.
//
// The client closes first, so TIME_WAIT is on the client's side and the
// server's sockets go away as soon as it closes (LAST_ACK, then gone). At
// ~15k connections/s a 12 s run leaves ~180k connections in TIME_WAIT (60 s on
// Linux), far more than the 28,232 ephemeral ports of one source address to
// one server port. So with -sources N (the default) the sockets are bound,
// round robin, to N source addresses 127.1.x.y with IP_BIND_ADDRESS_NO_PORT
// (the port is chosen at connect time, per 4-tuple, not reserved at bind), so
// each address's port range holds only its share and connect(2) finds a free
// port at once instead of searching a crowded range. SO_LINGER 0 (closing
// with a RST, no TIME_WAIT) would avoid all this too, but it changes what the
// server sees: a reset instead of an orderly EOF.

const ipBindAddressNoPort = 24 // IP_BIND_ADDRESS_NO_PORT, linux/in.h (not in package syscall)

const epollET = 1 << 31 // syscall.EPOLLET is a negative int, which an Events uint32 rejects

const (
	shortIdle = iota // between connections
	shortConnecting
	shortEchoing
)

type sclient struct {
	id        int
	gen       *generator
	seq       uint64 // connections this client has opened
	fd        int
	state     int
	req       []byte
	sent      int   // bytes of req written
	got       int   // bytes of the echo verified
	startedAt int64 // when socket(2) was called, on the run's clock
}

// sourceAddrs returns the source addresses for -sources n, or nil for "let
// the kernel choose" (n = 0, or a server that is not on IPv4 loopback).
func sourceAddrs(n int, server net.IP) []syscall.SockaddrInet4 {
	if n <= 0 || server.To4() == nil || !server.IsLoopback() {
		return nil
	}
	out := make([]syscall.SockaddrInet4, n)
	for i := range out {
		// 127.1.0.1, 127.1.0.2, ... (x.y never 0 or 255): all of 127/8 is loopback.
		out[i].Addr = [4]byte{127, 1, byte(i / 254), byte(i%254 + 1)}
	}
	return out
}

type shortReport struct {
	loadReport
	Sources     int `json:"sources"`
	Opened      int `json:"opened"`        // connections opened, warmup and drain included
	TimeWaitEnd int `json:"time_wait_end"` // sockets in TIME_WAIT system-wide at the end of the window
}

// bindSource binds fd to the source address src with IP_BIND_ADDRESS_NO_PORT:
// the port is chosen at connect(2) for the whole 4-tuple, so one source
// address is not limited to the ephemeral ports a plain bind would leave it.
func bindSource(fd int, src *syscall.SockaddrInet4) error {
	if err := syscall.SetsockoptInt(fd, syscall.IPPROTO_IP, ipBindAddressNoPort, 1); err != nil {
		return err
	}
	return syscall.Bind(fd, src)
}

// ipv4Server resolves -addr for the modes that dial raw IPv4 sockets, or
// exits with status 2 naming the mode.
func ipv4Server(mode, addr string) (syscall.SockaddrInet4, net.IP) {
	raddr, err := net.ResolveTCPAddr("tcp4", addr)
	if err != nil || raddr.IP.To4() == nil {
		fmt.Fprintln(os.Stderr, "loadgen: "+mode+" wants an IPv4 host:port:", addr)
		os.Exit(2)
	}
	server := syscall.SockaddrInet4{Port: raddr.Port}
	copy(server.Addr[:], raddr.IP.To4())
	return server, raddr.IP
}

// timeWait reads the "tw" count of /proc/net/sockstat (-1 if unreadable).
func timeWait() int {
	data, err := os.ReadFile("/proc/net/sockstat")
	if err != nil {
		return -1
	}
	f := strings.Fields(string(data))
	for i := 0; i+1 < len(f); i++ {
		if f[i] == "tw" {
			n, err := strconv.Atoi(f[i+1])
			if err == nil {
				return n
			}
		}
	}
	return -1
}

func runShort(cfg *config) (interface{}, bool) {
	errs := &errorLog{}
	runtime.LockOSThread()
	server, serverIP := ipv4Server("-short", cfg.addr)
	sources := sourceAddrs(cfg.sources, serverIP)
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen: epoll_create1:", err)
		os.Exit(2)
	}

	clients := make([]*sclient, cfg.conns)
	byFd := map[int]*sclient{}
	for i := range clients {
		clients[i] = &sclient{id: i, gen: newGenerator(i, cfg.size), fd: -1,
			req: make([]byte, cfg.size)}
	}
	start := time.Now()
	clock := func() int64 { return int64(time.Since(start)) }
	warmupEnd := int64(secs(cfg.warmup))
	measureEnd := warmupEnd + int64(secs(cfg.duration))
	hardEnd := measureEnd + int64(secs(cfg.echoTimeout)) + int64(5*time.Second)
	echoLimit := int64(secs(cfg.echoTimeout))
	phase := phaseWarmup
	var t0, t1 int64
	var cpu0, cpu1 float64
	var srv0, srv1 procSample
	var cores0, cores1 map[string][]uint64
	var hist histogram
	var measured, verified, mismatches uint64
	opened, nextSource, tw := 0, 0, -1

	finish := func(c *sclient) { // close the connection (the client closes first)
		delete(byFd, c.fd)
		syscall.Close(c.fd)
		c.fd, c.state = -1, shortIdle
	}
	fail := func(c *sclient, format string, args ...interface{}) {
		errs.add(format, args...)
		finish(c)
	}
	open := func(c *sclient, now int64) {
		c.gen.fill(c.req, c.seq)
		c.seq++
		c.sent, c.got, c.startedAt = 0, 0, now
		fd, err := syscall.Socket(syscall.AF_INET,
			syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
		if err != nil {
			errs.add("client %d: socket: %v", c.id, err)
			return
		}
		if sources != nil {
			src := sources[nextSource%len(sources)]
			nextSource++
			err = bindSource(fd, &src)
			if err != nil {
				syscall.Close(fd)
				errs.add("client %d: binding a source address: %v", c.id, err)
				return
			}
		}
		if err := syscall.Connect(fd, &server); err != nil && err != syscall.EINPROGRESS {
			syscall.Close(fd)
			errs.add("client %d: connect: %v", c.id, err)
			return
		}
		ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLOUT | syscall.EPOLLRDHUP | epollET,
			Fd: int32(fd)}
		if err := syscall.EpollCtl(epfd, syscall.EPOLL_CTL_ADD, fd, &ev); err != nil {
			syscall.Close(fd)
			errs.add("client %d: epoll_ctl: %v", c.id, err)
			return
		}
		c.fd, c.state = fd, shortConnecting
		byFd[fd] = c
		opened++
	}
	advance := func(now int64) {
		if phase == phaseWarmup && now >= warmupEnd {
			phase = phaseMeasure
			t0, cpu0, srv0, cores0 = clock(), selfCPU(), sampleProc(cfg.serverPid), cpuTimes()
		}
		if phase == phaseMeasure && now >= measureEnd {
			phase = phaseStop // connections under way finish; no new ones
			t1, cpu1, srv1, cores1 = clock(), selfCPU(), sampleProc(cfg.serverPid), cpuTimes()
			tw = timeWait()
		}
	}

	now := clock()
	advance(now)
	for _, c := range clients {
		open(c, now)
	}
	events := make([]syscall.EpollEvent, 512)
	rbuf := make([]byte, 2*cfg.size) // room for more than an echo, to catch extra bytes
	lastSweep := now
	for len(byFd) > 0 || (phase != phaseStop && errs.count < cfg.maxFail) {
		timeout := 50
		if phase == phaseWarmup {
			if ms := int((warmupEnd-now)/int64(time.Millisecond)) + 1; ms < timeout {
				timeout = ms
			}
		} else if phase == phaseMeasure {
			if ms := int((measureEnd-now)/int64(time.Millisecond)) + 1; ms < timeout {
				timeout = ms
			}
		}
		n, err := syscall.EpollWait(epfd, events, timeout)
		if err != nil && err != syscall.EINTR {
			fmt.Fprintln(os.Stderr, "loadgen: epoll_wait:", err)
			os.Exit(2)
		}
		now = clock()
		advance(now)
		for i := 0; i < n; i++ {
			c := byFd[int(events[i].Fd)]
			if c == nil {
				continue
			}
			ev := events[i].Events
			if c.state == shortConnecting && ev&(syscall.EPOLLOUT|syscall.EPOLLERR|syscall.EPOLLHUP) != 0 {
				m, err := syscall.Write(c.fd, c.req[c.sent:])
				if err == syscall.EAGAIN || err == syscall.EINTR {
					continue // not connected yet, or a spurious edge: wait for the next
				}
				if err != nil {
					fail(c, "client %d: connect or write: %v", c.id, err)
					continue
				}
				c.sent += m
				if c.sent == len(c.req) {
					c.state = shortEchoing
				}
			}
			if c.state != shortEchoing || ev&(syscall.EPOLLIN|syscall.EPOLLRDHUP|
				syscall.EPOLLERR|syscall.EPOLLHUP) == 0 {
				continue
			}
			// Edge-triggered: read until EAGAIN, or a short read (queue drained).
			for c.state == shortEchoing {
				m, err := syscall.Read(c.fd, rbuf)
				if err == syscall.EINTR {
					continue
				}
				if err == syscall.EAGAIN {
					break
				}
				if err != nil {
					fail(c, "client %d: read after %d of %d echo bytes: %v", c.id, c.got, cfg.size, err)
					break
				}
				if m == 0 {
					fail(c, "client %d: EOF after %d of %d echo bytes", c.id, c.got, cfg.size)
					break
				}
				if c.got+m > cfg.size || !bytes.Equal(rbuf[:m], c.req[c.got:c.got+m]) {
					mismatches++
					want := c.req[c.got:]
					fail(c, "client %d: echo of connection %d differs at byte %d: got %q want %q",
						c.id, c.seq-1, c.got, trunc(rbuf[:m]), trunc(want))
					break
				}
				c.got += m
				if c.got == cfg.size {
					verified++
					if phase == phaseMeasure {
						measured++
						hist.record(uint64(now - c.startedAt))
					}
					finish(c)
					break
				}
				if m < len(rbuf) {
					break
				}
			}
		}
		// A connection past -echo-timeout is an error, not a hang (swept every 100 ms).
		if now-lastSweep > int64(100*time.Millisecond) || now > hardEnd {
			lastSweep = now
			for _, c := range clients {
				if c.state != shortIdle && (now-c.startedAt > echoLimit || now > hardEnd) {
					fail(c, "client %d: connection %d not echoed after %.1f s (state %d, %d bytes)",
						c.id, c.seq-1, float64(now-c.startedAt)/1e9, c.state, c.got)
				}
			}
		}
		if phase != phaseStop && errs.count < cfg.maxFail {
			for _, c := range clients {
				if c.state == shortIdle {
					open(c, now)
				}
			}
		}
	}
	syscall.Close(epfd)
	if t1 == 0 { // stopped before the window closed: too many failures
		t1, cpu1, srv1, cores1 = clock(), selfCPU(), sampleProc(cfg.serverPid), cpuTimes()
		if t0 == 0 {
			t0, cpu0, srv0, cores0 = t1, cpu1, srv1, cores1
		}
		errs.add("stopped after %d failures", errs.count)
	}

	window := float64(t1-t0) / 1e9
	if window <= 0 {
		window = 1e-9
	}
	rep := shortReport{loadReport: loadReport{
		Mode: "short", Addr: cfg.addr, Conns: cfg.conns, Connected: cfg.conns,
		Size: cfg.size, Depth: 1, WarmupS: cfg.warmup, DurationS: math.Round(window*1000) / 1000,
		Requests: measured, ReqPerS: round2(float64(measured) / window),
		MBPerS:   round2(float64(measured) * float64(cfg.size) / window / 1e6),
		Verified: verified, Mismatches: mismatches, Errors: errs.count, ErrorSamples: errs.samples,
		LoadgenCPUS:   round2(cpu1 - cpu0),
		LoadgenCPUPct: round2((cpu1 - cpu0) / window * 100),
		Cores:         coreDelta(cores0, cores1, window, cfg.clkTck, measured),
	}, Sources: len(sources), Opened: opened, TimeWaitEnd: tw}
	if rep.ErrorSamples == nil {
		rep.ErrorSamples = []string{}
	}
	if hist.n > 0 {
		rep.LatencyUs = latencyJSON{
			P50: round2(hist.quantile(0.50)), P90: round2(hist.quantile(0.90)),
			P99: round2(hist.quantile(0.99)), P999: round2(hist.quantile(0.999)),
			Max: round2(float64(hist.max) / 1000), Mean: round2(float64(hist.sum) / float64(hist.n) / 1000),
		}
	}
	if cfg.serverPid > 0 {
		s := &serverStats{Pid: cfg.serverPid, RSSKiBStart: srv0.rssKiB, RSSKiBEnd: srv1.rssKiB}
		if srv0.ok && srv1.ok {
			cpu := float64(srv1.cpuTicks-srv0.cpuTicks) / float64(cfg.clkTck)
			s.CPUS = fptr(round2(cpu))
			s.CPUPct = fptr(round2(cpu / window * 100))
			if measured > 0 {
				s.CPUUsPerReq = fptr(round2(cpu * 1e6 / float64(measured)))
			}
		}
		rep.Server = s
	}
	return rep, mismatches == 0 && errs.count == 0 && measured > 0
}

// ---------------------------------------------------------------- dialling

func dialRetry(ctx context.Context, cfg *config) (net.Conn, error) {
	d := net.Dialer{Timeout: secs(cfg.dialTimeout)}
	backoff := 50 * time.Millisecond
	var err error
	for attempt := 0; attempt <= cfg.retries; attempt++ {
		var c net.Conn
		c, err = d.DialContext(ctx, "tcp", cfg.addr)
		if err == nil {
			return c, nil
		}
		if ctx.Err() != nil {
			break
		}
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
		}
		backoff *= 2
	}
	return nil, err
}

// --------------------------------------------------------------- idle mode

var errMismatch = errors.New("echo mismatch")

// echoOnce sends request seq on c and verifies its echo.
func echoOnce(c net.Conn, gen *generator, seq uint64, deadline time.Time) error {
	_ = c.SetDeadline(deadline)
	req := make([]byte, gen.size)
	gen.fill(req, seq)
	if _, err := c.Write(req); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	got := make([]byte, gen.size)
	if _, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if !bytes.Equal(got, req) {
		return fmt.Errorf("%w: got %q want %q", errMismatch, trunc(got), trunc(req))
	}
	return nil
}

type idleReport struct {
	Mode            string       `json:"mode"`
	Addr            string       `json:"addr"`
	Requested       int          `json:"requested"`
	Attempted       int          `json:"attempted"`
	Established     int64        `json:"established"`
	VerifiedInitial int64        `json:"verified_initial"`
	VerifiedFinal   int64        `json:"verified_final"`
	DialFailures    int64        `json:"dial_failures"`
	EchoFailures    int64        `json:"echo_failures"`
	Mismatches      int64        `json:"mismatches"`
	RampS           float64      `json:"ramp_s"`
	HoldS           float64      `json:"hold_s"`
	NofileLimit     uint64       `json:"nofile_limit"`
	Errors          int          `json:"errors"`
	ErrorSamples    []string     `json:"error_samples"`
	LoadgenCPUS     float64      `json:"loadgen_cpu_s"`
	Server          *serverStats `json:"server,omitempty"`
}

func runIdle(cfg *config, nofile uint64) (interface{}, bool) {
	errs := &errorLog{}
	n := cfg.idle
	before := sampleProc(cfg.serverPid)
	cpu0 := selfCPU()
	t0 := time.Now()
	rampCtx, cancel := context.WithDeadline(context.Background(), t0.Add(secs(cfg.rampTimeout)))
	defer cancel()

	conns := make([]net.Conn, n)
	gens := make([]*generator, n)
	var established, verifiedInitial, verifiedFinal, dialFail, echoFail, mism, failures atomic.Int64
	count := func(err error) {
		if errors.Is(err, errMismatch) {
			mism.Add(1)
		} else {
			echoFail.Add(1)
		}
	}
	sem := make(chan struct{}, cfg.ramp)
	var wg sync.WaitGroup
	attempted := 0
	for i := 0; i < n; i++ {
		if failures.Load() >= int64(cfg.maxFail) || rampCtx.Err() != nil {
			errs.add("ramp stopped after %d of %d connections (%d failures, ramp deadline passed: %v)",
				i, n, failures.Load(), rampCtx.Err() != nil)
			break
		}
		sem <- struct{}{}
		attempted++
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			defer func() { <-sem }()
			c, err := dialRetry(rampCtx, cfg)
			if err != nil {
				dialFail.Add(1)
				failures.Add(1)
				errs.add("conn %d: dial: %v", i, err)
				return
			}
			established.Add(1)
			gens[i] = newGenerator(i, cfg.size)
			deadline := time.Now().Add(secs(cfg.echoTimeout))
			if dl, ok := rampCtx.Deadline(); ok && dl.Before(deadline) {
				deadline = dl
			}
			if err := echoOnce(c, gens[i], 0, deadline); err != nil {
				count(err)
				failures.Add(1)
				errs.add("conn %d: first echo: %v", i, err)
				c.Close()
				return
			}
			verifiedInitial.Add(1)
			conns[i] = c
		}(i)
	}
	wg.Wait()
	rampS := time.Since(t0).Seconds()
	estab := sampleProc(cfg.serverPid)

	time.Sleep(secs(cfg.hold))
	held := sampleProc(cfg.serverPid)

	deadline := time.Now().Add(secs(cfg.echoTimeout))
	for i, c := range conns {
		if c == nil {
			continue
		}
		wg.Add(1)
		go func(i int, c net.Conn) {
			defer wg.Done()
			if err := echoOnce(c, gens[i], 1, deadline); err != nil {
				count(err)
				errs.add("conn %d: echo after hold: %v", i, err)
				return
			}
			verifiedFinal.Add(1)
		}(i, c)
	}
	wg.Wait()
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}

	rep := idleReport{
		Mode: "idle", Addr: cfg.addr, Requested: n, Attempted: attempted,
		Established: established.Load(), VerifiedInitial: verifiedInitial.Load(),
		VerifiedFinal: verifiedFinal.Load(), DialFailures: dialFail.Load(),
		EchoFailures: echoFail.Load(), Mismatches: mism.Load(),
		RampS: round2(rampS), HoldS: cfg.hold, NofileLimit: nofile,
		Errors: errs.count, ErrorSamples: errs.samples, LoadgenCPUS: round2(selfCPU() - cpu0),
	}
	if rep.ErrorSamples == nil {
		rep.ErrorSamples = []string{}
	}
	if cfg.serverPid > 0 {
		s := &serverStats{Pid: cfg.serverPid, RSSKiBBefore: before.rssKiB,
			RSSKiBEstab: estab.rssKiB, RSSKiBHeld: held.rssKiB}
		if before.ok && held.ok && rep.VerifiedInitial > 0 {
			s.RSSKiBPerCon = fptr(round2((float64(held.rssKiB) - float64(before.rssKiB)) /
				float64(rep.VerifiedInitial)))
		}
		rep.Server = s
	}
	ok := rep.Mismatches == 0 && rep.VerifiedFinal == int64(n)
	return rep, ok
}

// -------------------------------------------------------------------- main

func main() {
	cfg := &config{}
	flag.StringVar(&cfg.addr, "addr", "127.0.0.1:9000", "server host:port")
	flag.IntVar(&cfg.conns, "conns", 1, "connections (load mode)")
	flag.IntVar(&cfg.size, "size", 64, "bytes per request, trailing newline included")
	flag.IntVar(&cfg.depth, "depth", 1, "requests in flight per connection (1 = request/response)")
	flag.Float64Var(&cfg.duration, "duration", 10, "measured window, seconds")
	flag.Float64Var(&cfg.warmup, "warmup", 2, "warmup before the window, seconds")
	flag.BoolVar(&cfg.jsonOut, "json", false, "print one JSON object instead of text")
	split := flag.Bool("split", false, "load mode: one write(2) per request, never coalesced")
	flag.IntVar(&cfg.idle, "idle", 0, "idle mode: open this many connections and hold them")
	flag.Float64Var(&cfg.hold, "hold", 10, "idle mode: seconds to hold the connections")
	flag.IntVar(&cfg.serverPid, "server-pid", 0, "sample this process's CPU time and RSS")
	flag.IntVar(&cfg.clkTck, "clk-tck", 100, "clock ticks per second of /proc/PID/stat (getconf CLK_TCK)")
	flag.IntVar(&cfg.ramp, "ramp", 64, "idle mode: connections being opened at once")
	flag.IntVar(&cfg.retries, "retries", 3, "dial retries per connection")
	flag.Float64Var(&cfg.dialTimeout, "dial-timeout", 5, "seconds per dial attempt")
	flag.Float64Var(&cfg.echoTimeout, "echo-timeout", 10, "idle mode: seconds allowed per verified echo")
	flag.Float64Var(&cfg.rampTimeout, "ramp-timeout", 120, "idle mode: seconds allowed to open all connections")
	flag.IntVar(&cfg.maxFail, "max-failures", 200, "idle and short modes: stop opening connections after this many failures")
	flag.IntVar(&cfg.requests, "requests", 0, "load mode: send exactly this many requests in all, then stop (no warmup; -duration is the time limit)")
	flag.BoolVar(&cfg.short, "short", false, "short mode: each of -conns clients connects, echoes one line, closes, again and again")
	flag.IntVar(&cfg.sources, "sources", 64, "short mode: bind client sockets across this many 127.1.x.y source addresses (0: one, the kernel's choice)")
	flag.BoolVar(&cfg.tls, "tls", false, "load mode over TLS (request/response only; the certificate is not verified)")
	flag.Parse()
	if *split {
		writeLimit = cfg.size
	}
	if cfg.size < 2 || cfg.depth < 1 || cfg.conns < 1 || cfg.duration <= 0 || cfg.warmup < 0 ||
		cfg.idle < 0 || cfg.ramp < 1 || cfg.clkTck < 1 || cfg.sources < 0 || cfg.sources > 254*254 ||
		(cfg.requests != 0 && cfg.requests < cfg.conns) || cfg.maxFail < 1 {
		fmt.Fprintln(os.Stderr, "loadgen: invalid arguments (size >= 2, depth/conns/ramp/max-failures >= 1, "+
			"duration > 0, 0 <= sources <= 64516, requests 0 or >= conns)")
		os.Exit(2)
	}
	nofile := raiseNofile()

	var rep interface{}
	var ok bool
	if many.n > 0 {
		runMany(cfg)
		return
	}
	if cfg.idle > 0 {
		rep, ok = runIdle(cfg, nofile)
	} else if cfg.short {
		rep, ok = runShort(cfg)
	} else if cfg.tls {
		rep, ok = runLoadTLS(cfg)
	} else {
		rep, ok = runLoad(cfg)
	}
	if cfg.jsonOut {
		out, _ := json.Marshal(rep)
		fmt.Println(string(out))
	} else {
		printText(rep)
	}
	if !ok {
		os.Exit(1)
	}
}

func printText(rep interface{}) {
	switch r := rep.(type) {
	case shortReport:
		fmt.Printf("%s  short connections: %d clients, %d-byte line, window %.2fs, %d source addresses\n",
			r.Addr, r.Conns, r.Size, r.DurationS, r.Sources)
		fmt.Printf("connections %d  %.0f conn/s  (opened %d, TIME_WAIT at the end %d)\n",
			r.Requests, r.ReqPerS, r.Opened, r.TimeWaitEnd)
		fmt.Printf("connect-to-echo us: p50 %.1f  p90 %.1f  p99 %.1f  p99.9 %.1f  max %.1f\n",
			r.LatencyUs.P50, r.LatencyUs.P90, r.LatencyUs.P99, r.LatencyUs.P999, r.LatencyUs.Max)
		fmt.Printf("verified %d  mismatches %d  errors %d  loadgen cpu %.1f%%\n",
			r.Verified, r.Mismatches, r.Errors, r.LoadgenCPUPct)
		if r.Server != nil && r.Server.CPUUsPerReq != nil {
			fmt.Printf("server cpu %.1f%%  %.2f us/conn  rss %d KiB\n",
				*r.Server.CPUPct, *r.Server.CPUUsPerReq, r.Server.RSSKiBEnd)
		}
		printErrors(r.ErrorSamples)
	case loadReport:
		fmt.Printf("%s  conns=%d/%d size=%d depth=%d window=%.2fs\n",
			r.Addr, r.Connected, r.Conns, r.Size, r.Depth, r.DurationS)
		fmt.Printf("requests %d  %.0f req/s  %.2f MB/s\n", r.Requests, r.ReqPerS, r.MBPerS)
		fmt.Printf("latency us: p50 %.1f  p90 %.1f  p99 %.1f  p99.9 %.1f  max %.1f\n",
			r.LatencyUs.P50, r.LatencyUs.P90, r.LatencyUs.P99, r.LatencyUs.P999, r.LatencyUs.Max)
		fmt.Printf("verified %d  mismatches %d  errors %d  loadgen cpu %.1f%%\n",
			r.Verified, r.Mismatches, r.Errors, r.LoadgenCPUPct)
		if r.Server != nil && r.Server.CPUUsPerReq != nil {
			fmt.Printf("server cpu %.1f%%  %.2f us/req  rss %d KiB\n",
				*r.Server.CPUPct, *r.Server.CPUUsPerReq, r.Server.RSSKiBEnd)
		}
		cpus := make([]string, 0, len(r.Cores))
		for cpu := range r.Cores {
			cpus = append(cpus, cpu)
		}
		sort.Strings(cpus)
		for _, cpu := range cpus {
			c := r.Cores[cpu]
			fmt.Printf("cpu%s busy %.1f%% (softirq %.1f%%, steal %.1f%%)\n", cpu, c.BusyPct, c.SoftirqPct, c.StealPct)
		}
		printErrors(r.ErrorSamples)
	case idleReport:
		fmt.Printf("%s  requested %d  established %d  verified %d then %d after %.1fs hold (ramp %.2fs)\n",
			r.Addr, r.Requested, r.Established, r.VerifiedInitial, r.VerifiedFinal, r.HoldS, r.RampS)
		fmt.Printf("dial failures %d  echo failures %d  mismatches %d\n",
			r.DialFailures, r.EchoFailures, r.Mismatches)
		if r.Server != nil && r.Server.RSSKiBPerCon != nil {
			fmt.Printf("server rss %d -> %d KiB  (%.2f KiB/conn)\n",
				r.Server.RSSKiBBefore, r.Server.RSSKiBHeld, *r.Server.RSSKiBPerCon)
		}
		printErrors(r.ErrorSamples)
	}
}

func printErrors(samples []string) {
	sort.Strings(samples)
	for _, s := range samples {
		fmt.Println("  error:", s)
	}
}
