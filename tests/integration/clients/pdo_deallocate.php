<?php
// PHP PDO (pdo_pgsql) with server-side prepares (ATTR_EMULATE_PREPARES off): destroying a PDOStatement
// makes PDO send SQL `DEALLOCATE pdo_stmt_00000001` itself, here inside a transaction (issue 12,
// input 4). Connection from PDO_DSN, PDO_USER, PDO_PASSWORD; PDO_RUN tags this run's rows. Prints one
// JSON object per result, so a run through the proxy can be compared with a direct one line by line.
$pdo = new PDO(getenv('PDO_DSN'), getenv('PDO_USER'), getenv('PDO_PASSWORD'), [
    PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION,
    PDO::ATTR_EMULATE_PREPARES => false,
]);
$run = (int) getenv('PDO_RUN');

$pdo->beginTransaction();
$insert = $pdo->prepare('INSERT INTO conformance_scratch (run, n) VALUES (?, ?)');
$insert->execute([$run, 1]);
echo json_encode(['inserted' => $insert->rowCount()]), "\n";
unset($insert);  // DEALLOCATE pdo_stmt_00000001, inside the transaction
$count = $pdo->prepare('SELECT count(*) FROM conformance_scratch WHERE run = ?');
$count->execute([$run]);
echo json_encode(['in_transaction' => $count->fetchColumn(), 'active' => $pdo->inTransaction()]), "\n";
unset($count);  // DEALLOCATE pdo_stmt_00000002
$pdo->commit();

$after = $pdo->prepare('SELECT count(*) FROM conformance_scratch WHERE run = ?');
$after->execute([$run]);
echo json_encode(['after_commit' => $after->fetchColumn()]), "\n";
