/*
 * The second teaching guest (docs/LABS.md, exercise 7): one instruction
 * that the nested PVM KVM of this project's hosts cannot emulate.
 *
 * Entered like hello.S: real mode, CS:IP = 0:0x1000. It computes
 * popcnt(0xff), prints "popcnt(0xff) = 8" on COM1 and reports exit status 0
 * on vmlab's status port. On hardware virtualization the CPU executes
 * `popcnt` itself; on a kvm_pvm host KVM's instruction emulator rejects it,
 * the vCPU exits with KVM_EXIT_INTERNAL_ERROR (emulation failure), and
 * vmlab's fallback (src/emulate.rs) decodes and executes it and resumes
 * the guest. The output is the same either way; `--stats` shows the
 * difference.
 */
        .code16
        .section .text
        .globl  _start
_start:
        cli
        xor     %ax, %ax
        mov     %ax, %ds
        mov     %ax, %ss
        mov     $0x1000, %sp

        mov     $0xff, %bx
        popcnt  %bx, %ax                /* ax = number of set bits = 8 */
        add     $'0', %al
        mov     %al, digit

        mov     $message, %si
        mov     $0x3f8, %dx
1:      lodsb
        test    %al, %al
        jz      2f
        out     %al, %dx
        jmp     1b
2:      xor     %al, %al
        out     %al, $0xf5              /* exit status 0: vmlab stops the VM */
3:      hlt
        jmp     3b

message:
        .ascii  "popcnt(0xff) = "
digit:  .ascii  "?"
        .asciz  "\n"
