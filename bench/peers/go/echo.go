// The classic Go line-echo server that echosvc mirrors: net.Listen, one
// goroutine per connection, bufio.Reader.ReadString('\n') with a read
// deadline armed before every line, one conn.Write per line.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"log"
	"net"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"
)

const readTimeout = 300 * time.Second

func handle(conn net.Conn) {
	defer conn.Close()
	r := bufio.NewReader(conn)
	for {
		conn.SetReadDeadline(time.Now().Add(readTimeout))
		line, err := r.ReadString('\n')
		if err != nil {
			return // EOF, deadline or reset (an unterminated final line is dropped)
		}
		if _, err := conn.Write([]byte(line)); err != nil {
			return
		}
	}
}

func main() {
	host := flag.String("host", "127.0.0.1", "address to listen on")
	port := flag.Int("port", 9000, "port to listen on")
	reusePort := flag.Bool("reuseport", false, "set SO_REUSEPORT, so several copies share the port (bench/c250k.py)")
	flag.Parse()

	var lc net.ListenConfig
	if *reusePort {
		lc.Control = func(network, address string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, 0xf /* SO_REUSEPORT */, 1)
			})
			if err != nil {
				return err
			}
			return serr
		}
	}
	ln, err := lc.Listen(context.Background(), "tcp", net.JoinHostPort(*host, strconv.Itoa(*port)))
	if err != nil {
		log.Fatal(err)
	}
	go func() {
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
		<-sig
		ln.Close()
		os.Exit(0)
	}()
	for {
		conn, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			log.Print(err) // e.g. EMFILE: back off briefly and keep serving
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go handle(conn)
	}
}
