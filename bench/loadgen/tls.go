package main

// --------------------------------------------------------------- TLS load mode
//
// -tls: load mode over TLS (request/response, -depth 1), for a server started
// with a certificate. The epoll loop of runLoad works on raw sockets and
// cannot speak TLS, so here each connection is a goroutine on a crypto/tls
// client: write one request, io.ReadFull its echo, verify, record the latency.
// The window, the server's CPU and the report are runLoad's. The certificate
// is not verified (-tls skips verification: the bench measures the server,
// and the harness's servers use a throw-away self-signed certificate).

import (
	"bytes"
	"context"
	"crypto/tls"
	"io"
	"sync"
	"sync/atomic"
	"time"
)

func runLoadTLS(cfg *config) (interface{}, bool) {
	errs := &errorLog{}
	var errMu sync.Mutex
	addErr := func(format string, args ...interface{}) {
		errMu.Lock()
		errs.add(format, args...)
		errMu.Unlock()
	}
	tcfg := &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS12} //nolint:gosec
	var conns []*tls.Conn
	for i := 0; i < cfg.conns; i++ {
		nc, err := dialRetry(context.Background(), cfg)
		if err != nil {
			errs.add("conn %d: dial: %v", i, err)
			continue
		}
		tc := tls.Client(nc, tcfg)
		_ = tc.SetDeadline(time.Now().Add(secs(cfg.dialTimeout)))
		if err := tc.Handshake(); err != nil {
			errs.add("conn %d: handshake: %v", i, err)
			nc.Close()
			continue
		}
		_ = tc.SetDeadline(time.Time{})
		conns = append(conns, tc)
	}
	connected := len(conns)
	version := ""
	if connected > 0 {
		version = map[uint16]string{tls.VersionTLS12: "TLSv1.2", tls.VersionTLS13: "TLSv1.3"}[conns[0].ConnectionState().Version]
	}

	const (
		warm = int32(phaseWarmup)
		meas = int32(phaseMeasure)
		stop = int32(phaseStop)
	)
	var phase atomic.Int32
	phase.Store(warm)
	results := make([]connResult, len(conns))
	var wg sync.WaitGroup
	start := time.Now()
	for i, c := range conns {
		wg.Add(1)
		go func(i int, c *tls.Conn) {
			defer wg.Done()
			defer c.Close()
			gen := newGenerator(i, cfg.size)
			req := make([]byte, cfg.size)
			got := make([]byte, cfg.size)
			res := &results[i]
			for seq := uint64(0); ; seq++ {
				p := phase.Load()
				if p == stop {
					return
				}
				gen.fill(req, seq)
				sent := time.Now()
				_ = c.SetDeadline(sent.Add(30 * time.Second)) // a stalled server is an error
				if _, err := c.Write(req); err != nil {
					addErr("conn %d: write: %v", i, err)
					return
				}
				if _, err := io.ReadFull(c, got); err != nil {
					addErr("conn %d: read: %v", i, err)
					return
				}
				res.verified++
				if !bytes.Equal(got, req) {
					res.mismatches++
					addErr("conn %d: mismatch: got %q want %q", i, trunc(got), trunc(req))
					return
				}
				if p == meas && phase.Load() == meas {
					res.measured++
					res.hist.record(uint64(time.Since(sent)))
				}
			}
		}(i, c)
	}
	time.Sleep(secs(cfg.warmup))
	t0, cpu0, srv0, cores0 := time.Since(start), selfCPU(), sampleProc(cfg.serverPid), cpuTimes()
	phase.Store(meas)
	time.Sleep(secs(cfg.duration))
	phase.Store(stop)
	t1, cpu1, srv1, cores1 := time.Since(start), selfCPU(), sampleProc(cfg.serverPid), cpuTimes()
	wg.Wait()

	ptrs := make([]*connResult, len(results))
	for i := range results {
		ptrs[i] = &results[i]
	}
	rep := newLoadReport(cfg, "load-tls "+version, 1, connected, ptrs, errs,
		(t1 - t0).Seconds(), cpu1-cpu0, srv0, srv1, cores0, cores1)
	measured, mismatches := rep.Requests, rep.Mismatches
	if cfg.depth != 1 {
		errs.add("-tls supports -depth 1 only")
		rep.Errors, rep.ErrorSamples = errs.count, errs.samples
	}
	ok := mismatches == 0 && errs.count == 0 && connected == cfg.conns && measured > 0
	return rep, ok
}
