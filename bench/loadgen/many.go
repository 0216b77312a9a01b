// Many mode (-many N): hold N connections from one process, driven by one
// thread and one epoll instance, for bench/c250k.py.
//
// Why not idle mode (goroutines): one goroutine per connection costs a 2-8 KiB
// stack and a park/unpark per echo on the client side, which on this 2-core
// box competes with the server for the same CPUs. Here a connection is a
// small struct and a file descriptor: registered once with
// EPOLLIN|EPOLLOUT|EPOLLRDHUP|EPOLLET at connect(2), never touched by
// epoll_ctl again.
//
// Every socket binds, round robin, one of -src (comma-separated 127.x.y.z
// addresses) with IP_BIND_ADDRESS_NO_PORT, so the port is picked per 4-tuple
// at connect(2): each source address has the whole ephemeral range
// (28,232 ports here) towards the one server address and port.
//
// The life of a run, one JSON object per line on stdout:
//
//   - ramp: at most -ramp connects in flight; each connection, once
//     connected, writes request 0 and verifies its echo ("round 0"). A
//     "progress" line every second (established, verified, failures).
//     Then one "ramped" line with the connect-to-first-echo latencies.
//   - hold: nothing is sent. A byte or an EOF from the server on a held
//     connection is a failure ("lost"), counted.
//   - orders on stdin, one per line:
//     "echo R RATE": round R (R >= 1) on every held connection, request R:
//     written all at once (RATE 0, a burst) or RATE connections per
//     second, evenly spaced; each latency runs from that connection's own
//     write to the last byte of its verified echo. Answered by an
//     "echoed" line with every latency in µs.
//     "close": close every connection, answer "closed", exit.
//     EOF on stdin is "close".
//
// Bounded: the ramp stops after -ramp-timeout or -max-failures; an echo not
// verified within -echo-timeout is a failure.
package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

type manyConfig struct {
	n    int
	src  string
	ramp int
}

var many manyConfig

func init() {
	flag.IntVar(&many.n, "many", 0, "many mode: hold this many connections from one epoll loop, commanded over stdin (bench/c250k.py)")
	flag.StringVar(&many.src, "src", "", "many mode: comma-separated source addresses (127.x.y.z), bound round robin with IP_BIND_ADDRESS_NO_PORT")
	flag.IntVar(&many.ramp, "many-ramp", 128, "many mode: connects in flight at once during the ramp")
}

const (
	mConnecting = iota + 1
	mEchoing
	mHeld
	mDead
)

type mconn struct {
	id      int
	fd      int
	state   int
	gen     *generator
	req     []byte
	got     int   // echo bytes verified of the current request
	sentAt  int64 // ns on the run's clock, when the current request was written (or socket(2) for round 0)
	round   int
	latency int64
}

type manyOut struct {
	Event       string   `json:"event"`
	T           float64  `json:"t"`
	Requested   int      `json:"requested,omitempty"`
	Attempted   int      `json:"attempted"`
	Established int      `json:"established"`
	Verified    int      `json:"verified"`
	Held        int      `json:"held"`
	Failures    int      `json:"failures"`
	Lost        int      `json:"lost"`
	Mismatches  int      `json:"mismatches"`
	Round       int      `json:"round,omitempty"`
	Rate        float64  `json:"rate,omitempty"`
	DurationS   float64  `json:"duration_s,omitempty"`
	LatenciesUs []int64  `json:"latencies_us,omitempty"`
	CPUS        float64  `json:"loadgen_cpu_s"`
	Errors      []string `json:"error_samples,omitempty"`
}

func runMany(cfg *config) {
	runtime.LockOSThread()
	errs := &errorLog{}
	server, _ := ipv4Server("-many", cfg.addr)
	var sources []syscall.SockaddrInet4
	for _, s := range strings.Split(many.src, ",") {
		if s == "" {
			continue
		}
		ip := net.ParseIP(strings.TrimSpace(s)).To4()
		if ip == nil {
			fmt.Fprintln(os.Stderr, "loadgen: -src: not an IPv4 address:", s)
			os.Exit(2)
		}
		var sa syscall.SockaddrInet4
		copy(sa.Addr[:], ip)
		sources = append(sources, sa)
	}
	epfd, err := syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if err != nil {
		fmt.Fprintln(os.Stderr, "loadgen: epoll_create1:", err)
		os.Exit(2)
	}
	start := time.Now()
	clock := func() int64 { return int64(time.Since(start)) }
	enc := json.NewEncoder(os.Stdout)
	cpu0 := selfCPU()

	conns := make([]*mconn, 0, many.n)
	byFd := make(map[int]*mconn, many.n)
	counts := struct{ established, verified, failures, lost, mismatches, inflight, echoing int }{}
	fail := func(c *mconn, lost bool, format string, args ...interface{}) {
		errs.add(format, args...)
		counts.failures++
		if lost {
			counts.lost++
		}
		if c.fd >= 0 {
			delete(byFd, c.fd)
			syscall.Close(c.fd)
			c.fd = -1
		}
		if c.round == 0 && (c.state == mConnecting || c.state == mEchoing) {
			counts.inflight--
		}
		if c.round > 0 && c.state == mEchoing {
			counts.echoing--
		}
		c.state = mDead
	}
	report := func(event string) manyOut {
		held := 0
		for _, c := range conns {
			if c.state == mHeld {
				held++
			}
		}
		s := errs.samples
		return manyOut{Event: event, T: round2(float64(clock()) / 1e9), Requested: many.n,
			Attempted: len(conns), Established: counts.established, Verified: counts.verified,
			Held: held, Failures: counts.failures, Lost: counts.lost, Mismatches: counts.mismatches,
			CPUS: round2(selfCPU() - cpu0), Errors: s}
	}
	nextSource := 0
	open := func(now int64) {
		c := &mconn{id: len(conns), fd: -1, gen: newGenerator(len(conns), cfg.size),
			req: make([]byte, cfg.size), sentAt: now}
		conns = append(conns, c)
		c.gen.fill(c.req, 0)
		fd, err := syscall.Socket(syscall.AF_INET,
			syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
		if err != nil {
			fail(c, false, "conn %d: socket: %v", c.id, err)
			return
		}
		c.fd = fd
		c.state = mConnecting
		counts.inflight++
		byFd[fd] = c
		if len(sources) > 0 {
			src := sources[nextSource%len(sources)]
			nextSource++
			err = bindSource(fd, &src)
			if err != nil {
				fail(c, false, "conn %d: binding a source address: %v", c.id, err)
				return
			}
		}
		if err := syscall.Connect(fd, &server); err != nil && err != syscall.EINPROGRESS {
			fail(c, false, "conn %d: connect: %v", c.id, err)
			return
		}
		ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLOUT | syscall.EPOLLRDHUP | epollET,
			Fd: int32(fd)}
		if err := syscall.EpollCtl(epfd, syscall.EPOLL_CTL_ADD, fd, &ev); err != nil {
			fail(c, false, "conn %d: epoll_ctl: %v", c.id, err)
		}
	}
	// write sends the connection's current request (64 bytes: the kernel
	// takes it whole, or it is a failure).
	write := func(c *mconn, now int64) {
		m, err := syscall.Write(c.fd, c.req)
		if err == syscall.EAGAIN {
			return // not connected yet: the next EPOLLOUT edge retries
		}
		if err != nil || m != len(c.req) {
			fail(c, c.round > 0, "conn %d: write of round %d: %d bytes, %v", c.id, c.round, m, err)
			return
		}
		if c.round > 0 {
			c.sentAt = clock() // a burst writes thousands in a row: each its own time
			counts.echoing++
		}
		c.got = 0
		c.state = mEchoing
	}
	rbuf := make([]byte, 2*cfg.size)
	// readable drains the socket (edge-triggered) and verifies what came.
	readable := func(c *mconn, now int64) {
		for c.state != mDead {
			m, err := syscall.Read(c.fd, rbuf)
			if err == syscall.EINTR {
				continue
			}
			if err == syscall.EAGAIN {
				return
			}
			if err != nil || m == 0 {
				what := "EOF"
				if err != nil {
					what = err.Error()
				}
				fail(c, c.state == mHeld || c.round > 0, "conn %d: %s in state %d, round %d, %d echo bytes",
					c.id, what, c.state, c.round, c.got)
				return
			}
			if c.state != mEchoing || c.got+m > cfg.size || !bytes.Equal(rbuf[:m], c.req[c.got:c.got+m]) {
				counts.mismatches++
				fail(c, c.state == mHeld, "conn %d: unexpected or wrong bytes in round %d: %q", c.id, c.round, trunc(rbuf[:m]))
				return
			}
			c.got += m
			if c.got == cfg.size {
				c.latency = clock() - c.sentAt // not the batch's time: its own
				c.state = mHeld
				if c.round == 0 {
					counts.established++
					counts.inflight--
				} else {
					counts.echoing--
				}
				counts.verified++
				return
			}
		}
	}
	events := make([]syscall.EpollEvent, 1024)
	poll := func(timeoutMs int) {
		n, err := syscall.EpollWait(epfd, events, timeoutMs)
		if err != nil && err != syscall.EINTR {
			fmt.Fprintln(os.Stderr, "loadgen: epoll_wait:", err)
			os.Exit(2)
		}
		now := clock()
		for i := 0; i < n; i++ {
			c := byFd[int(events[i].Fd)]
			if c == nil {
				continue
			}
			ev := events[i].Events
			if c.state == mConnecting && ev&(syscall.EPOLLOUT|syscall.EPOLLERR|syscall.EPOLLHUP) != 0 {
				if ev&(syscall.EPOLLERR|syscall.EPOLLHUP) != 0 {
					e, _ := syscall.GetsockoptInt(c.fd, syscall.SOL_SOCKET, syscall.SO_ERROR)
					fail(c, false, "conn %d: connect: %v", c.id, syscall.Errno(e))
					continue
				}
				write(c, now)
			}
			if c.state != mDead && ev&(syscall.EPOLLIN|syscall.EPOLLRDHUP|syscall.EPOLLERR|syscall.EPOLLHUP) != 0 {
				readable(c, now)
			}
		}
	}
	sweep := func(now int64, limit int64) {
		for _, c := range conns {
			if (c.state == mConnecting || c.state == mEchoing) && now-c.sentAt > limit {
				fail(c, c.round > 0, "conn %d: round %d not echoed after %.1f s (state %d, %d bytes)",
					c.id, c.round, float64(now-c.sentAt)/1e9, c.state, c.got)
			}
		}
	}

	// ---- ramp
	echoLimit := int64(secs(cfg.echoTimeout))
	rampEnd := int64(secs(cfg.rampTimeout))
	lastReport, lastSweep := int64(0), int64(0)
	for {
		now := clock()
		for counts.inflight < many.ramp && len(conns) < many.n && counts.failures < cfg.maxFail && now < rampEnd {
			open(now)
		}
		if counts.inflight == 0 && (len(conns) == many.n || counts.failures >= cfg.maxFail || now >= rampEnd) {
			break
		}
		poll(20)
		now = clock()
		if now-lastSweep > int64(100*time.Millisecond) {
			lastSweep = now
			sweep(now, echoLimit)
		}
		if now-lastReport >= int64(time.Second) {
			lastReport = now
			_ = enc.Encode(report("progress"))
		}
	}
	out := report("ramped")
	for _, c := range conns {
		if c.state == mHeld {
			out.LatenciesUs = append(out.LatenciesUs, c.latency/1000)
		}
	}
	_ = enc.Encode(out)

	// ---- hold, then orders
	orders := make(chan string)
	go func() {
		sc := bufio.NewScanner(os.Stdin)
		for sc.Scan() {
			orders <- sc.Text()
		}
		close(orders)
	}()
	for {
		var order string
		var ok bool
		select {
		case order, ok = <-orders:
		default:
			poll(50) // a held connection that breaks is counted as lost
			continue
		}
		f := strings.Fields(order)
		if !ok || (len(f) > 0 && f[0] == "close") {
			break
		}
		if len(f) != 3 || f[0] != "echo" {
			errs.add("unknown order %q", order)
			continue
		}
		round, err1 := strconv.Atoi(f[1])
		rate, err2 := strconv.ParseFloat(f[2], 64)
		if err1 != nil || err2 != nil || round < 1 || rate < 0 {
			errs.add("bad order %q", order)
			continue
		}
		var targets []*mconn
		for _, c := range conns {
			if c.state == mHeld {
				c.round = round
				c.gen.fill(c.req, uint64(round))
				targets = append(targets, c)
			}
		}
		verified0 := counts.verified
		t0 := clock()
		sent := 0
		for {
			now := clock()
			due := len(targets)
			if rate > 0 {
				due = int(float64(now-t0) / 1e9 * rate)
				if due > len(targets) {
					due = len(targets)
				}
			}
			for ; sent < due; sent++ {
				if targets[sent].state == mHeld {
					write(targets[sent], now)
				}
			}
			if sent == len(targets) && counts.echoing == 0 {
				break
			}
			timeout := 20
			if rate > 0 && sent < len(targets) {
				timeout = 1
			}
			poll(timeout)
			now = clock()
			if now-lastSweep > int64(100*time.Millisecond) {
				lastSweep = now
				sweep(now, echoLimit)
			}
		}
		out := report("echoed")
		out.Round, out.Rate = round, rate
		out.DurationS = round2(float64(clock()-t0) / 1e9)
		out.Verified = counts.verified - verified0
		for _, c := range targets {
			if c.state == mHeld {
				out.LatenciesUs = append(out.LatenciesUs, c.latency/1000)
			}
		}
		_ = enc.Encode(out)
	}
	for _, c := range conns {
		if c.fd >= 0 {
			syscall.Close(c.fd)
			c.fd = -1
		}
	}
	_ = enc.Encode(report("closed"))
}
